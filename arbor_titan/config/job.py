"""The root config: one dataclass per TOML section, each defined beside the code it configures."""

from dataclasses import dataclass, field

from arbor_titan.checkpoint.config import CheckpointConfig
from arbor_titan.config.fields import option
from arbor_titan.context.config import ContextConfig
from arbor_titan.data.config import DataConfig, TokenizerConfig
from arbor_titan.distributed.activation_checkpoint import ActivationCheckpointConfig
from arbor_titan.distributed.compile import CompileConfig
from arbor_titan.distributed.float8 import Float8Config, check_float8_run
from arbor_titan.distributed.parallel_dims import ParallelismConfig
from arbor_titan.growth.config import GrowthConfig
from arbor_titan.metrics.config import MetricsConfig
from arbor_titan.models.arbor.args import ModelConfig
from arbor_titan.optim.config import LRSchedulerConfig, OptimizerConfig
from arbor_titan.registry import PluginsConfig

PRECISIONS = ("float32", "bfloat16")


@dataclass
class JobSection:
    """The `[job]` section: where a run writes its outputs."""

    name: str = option("debug", "Run name; outputs go to <dump_folder>/<name>/.")
    dump_folder: str = option("./outputs", "Root folder for run outputs.")
    description: str = option("", "Free text recorded with the run.")


@dataclass
class TrainingConfig:
    """The `[training]` section: the optimization loop's sizes and numerics."""

    steps: int = option(200, "Optimizer steps to train.", ge=1)
    local_batch_size: int = option(8, "Sequences per micro-batch on each data-parallel rank.", ge=1)
    seq_len: int = option(256, "Tokens per training sequence.", ge=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches summed per optimizer step.", ge=1)
    max_norm: float = option(1.0, "Gradient clipping norm (0 disables clipping).", ge=0)
    seed: int = option(0, "Seed for model init, data order and sampling.", ge=0)
    mixed_precision_param: str = option(
        "float32", "Compute dtype: float32 or bfloat16 (FSDP2 casts parameters, else autocast)."
    )
    mixed_precision_reduce: str = option("float32", "Gradient reduce-scatter dtype under FSDP2.")
    cpu_offload: bool = option(False, "FSDP2: keep sharded parameters and optimizer state on CPU.")
    loss_chunk_len: int = option(
        0,
        "Sequence positions per chunk of output projection + loss (logits exist for one chunk "
        "at a time); 0: the whole sequence at once.",
        ge=0,
    )
    enable_tf32: bool = option(
        True, "CUDA fp32 matmuls on TF32 tensor cores (10-bit mantissa, ~7x fp32's rate)."
    )
    nonfinite_skip_limit: int = option(
        3,
        "Steps in a row whose update is skipped for a non-finite loss or gradient norm; one "
        "more stops the run (0: stop at the first).",
        ge=0,
    )
    oom_fallback: bool = option(
        True,
        "A step that runs out of device memory is replayed with more activation checkpointing "
        "(none, selective, full), then with half the micro-batch and twice the gradient "
        "accumulation (tokens per step unchanged); after the last fallback the run stops with "
        "the planner's advice. false: the error ends the run.",
    )
    memory_budget_gib: float = option(
        0,
        "Device memory per process that activation_checkpoint.mode = auto plans for and the "
        "near-capacity warning measures against; 0: the device's own (on CPU, RAM / processes).",
        ge=0,
    )
    hang_timeout_s: float = option(
        0,
        "No step finished within this many seconds: every rank writes its Python stacks to "
        "the run folder and exits non-zero (0 disables the watchdog).",
        ge=0,
    )

    def __post_init__(self) -> None:
        for key in ("mixed_precision_param", "mixed_precision_reduce"):
            if getattr(self, key) not in PRECISIONS:
                raise ValueError(
                    f"training.{key} must be one of {PRECISIONS}, got {getattr(self, key)!r}"
                )


@dataclass
class ValidationConfig:
    """The `[validation]` section: held-out loss during training."""

    enable: bool = option(True, "Compute validation loss on the held-out split.")
    freq: int = option(100, "Validate every this many steps (and at the last step).", ge=1)
    steps: int = option(10, "Validation batches per evaluation.", ge=1)
    seq_len: int = option(
        0, "Sequence length of the held-out batches; 0: the current training length.", ge=0
    )


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig
    )
    compile: CompileConfig = field(default_factory=CompileConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    context: ContextConfig = field(default_factory=ContextConfig)

    def __post_init__(self) -> None:
        # What float8 needs of other sections, checked before any data or model is built.
        check_float8_run(self.float8, self.training, self.parallelism)
