"""float8 training of the model's linear layers through torchao (the `[float8]` section).

`convert_to_float8` swaps eligible `nn.Linear`s for torchao's `Float8Linear` on the meta model,
before tensor parallel and FSDP2 see it (TorchTitan's order), so TP shards and FSDP2 all-gathers
the converted weights. With `enable_fsdp_float8_all_gather`, FSDP2 all-gathers weights already
cast to float8: half the bytes of a bf16 all-gather.

float8 matmuls need NVIDIA compute capability 8.9+ (Ada, Hopper, Blackwell). Elsewhere torchao's
emulation (`emulate=True`) runs the same casts and scales with high-precision matmuls: on CPU it
is chosen automatically so the numerics are testable anywhere; on an older GPU it must be asked
for with `float8.emulate`, because it is slower than plain bf16.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from arbor_titan.config.fields import option

if TYPE_CHECKING:
    from arbor_titan.config.job import TrainingConfig
    from arbor_titan.distributed.parallel_dims import ParallelismConfig

RECIPES = ("tensorwise", "rowwise")
# torch._scaled_mm needs both dims of each float8 operand divisible by 16.
FLOAT8_DIM_MULTIPLE = 16
MIN_CAPABILITY = (8, 9)


@dataclass
class Float8Config:
    """The `[float8]` section (TorchTitan's key names)."""

    enable_float8_linear: bool = option(
        False, "Train eligible linears in float8 (torchao); needs compute capability 8.9+."
    )
    recipe_name: str = option(
        "tensorwise", "Scaling: tensorwise (one scale per tensor) or rowwise (per row, finer)."
    )
    enable_fsdp_float8_all_gather: bool = option(
        False, "FSDP2 all-gathers weights in float8 (tensorwise only): half the bf16 traffic."
    )
    precompute_float8_dynamic_scale_for_fsdp: bool = option(
        False, "After each optimizer step, compute all weight scales in one all-reduce."
    )
    filter_fqns: list[str] = option(
        ["output"], "Linears whose name contains any of these stay in high precision."
    )
    emulate: bool = option(
        False, "Emulate float8 matmuls in high precision (numerics tests); automatic on CPU."
    )

    def __post_init__(self) -> None:
        if self.recipe_name not in RECIPES:
            raise ValueError(
                f"float8.recipe_name must be one of {', '.join(RECIPES)}, got {self.recipe_name!r}"
            )
        if self.enable_fsdp_float8_all_gather and self.recipe_name != "tensorwise":
            raise ValueError(
                "float8.enable_fsdp_float8_all_gather needs float8.recipe_name = 'tensorwise', "
                f"got {self.recipe_name!r}"
            )
        if self.precompute_float8_dynamic_scale_for_fsdp and not (
            self.enable_fsdp_float8_all_gather
        ):
            raise ValueError(
                "float8.precompute_float8_dynamic_scale_for_fsdp needs "
                "float8.enable_fsdp_float8_all_gather = true (it precomputes the all-gather scales)"
            )


def check_float8_run(
    cfg: Float8Config, training: "TrainingConfig", parallelism: "ParallelismConfig"
) -> None:
    """What float8 training needs of the other sections, so a config that can't run stops at
    load time with the keys to change rather than in a kernel mid-run:

    - rowwise scaling multiplies bf16 inputs (torch._scaled_mm has no fp32 rowwise kernel);
    - torch._scaled_mm needs the token dimension, like the weights', in multiples of 16: the
      tokens of one micro-batch (a pipeline micro-batch under pp) per tensor- and
      context-parallel rank.
    """
    if not cfg.enable_float8_linear:
        return
    if cfg.recipe_name == "rowwise" and training.mixed_precision_param != "bfloat16":
        raise ValueError(
            "float8.recipe_name = 'rowwise' needs training.mixed_precision_param = 'bfloat16' "
            f"(its scaled matmuls take bf16 inputs), got {training.mixed_precision_param!r}; "
            "set it, or use float8.recipe_name = 'tensorwise'"
        )
    sequences, where = training.local_batch_size, "training.local_batch_size"
    pp = parallelism.pipeline_parallel_degree
    if pp > 1:
        from arbor_titan.distributed.pipeline import num_microbatches

        microbatches = num_microbatches(parallelism, pp)
        sequences //= microbatches
        where = f"(training.local_batch_size / {microbatches} pipeline micro-batches)"
    # Context parallelism splits each sequence over its ranks before tensor parallelism splits
    # the rest: a rank's matmuls see tokens / (cp · tp).
    tp, cp = parallelism.tensor_parallel_degree, parallelism.context_parallel_degree
    tokens = sequences * training.seq_len
    if tokens % (FLOAT8_DIM_MULTIPLE * tp * cp):
        raise ValueError(
            "float8.enable_float8_linear needs the tokens of a micro-batch per tensor- and "
            f"context-parallel rank to be a multiple of {FLOAT8_DIM_MULTIPLE} (float8 matmuls): "
            f"{where} {sequences} x training.seq_len {training.seq_len} / "
            f"(parallelism.tensor_parallel_degree {tp} x parallelism.context_parallel_degree "
            f"{cp}) = {tokens / (tp * cp):g}; change those keys, or set "
            "float8.enable_float8_linear = false"
        )


def check_float8_layout(cfg: Float8Config, fsdp_enabled: bool) -> None:
    """Float8 all-gathers are FSDP2's: without parameter sharding (known once the world size
    resolves the degrees) the setting would do nothing, so the run stops instead."""
    if cfg.enable_float8_linear and cfg.enable_fsdp_float8_all_gather and not fsdp_enabled:
        raise ValueError(
            "float8.enable_fsdp_float8_all_gather needs FSDP (parameters sharded over data- or "
            "context-parallel ranks), but this run's layout shards nothing; set it to false or "
            "run with parallelism.data_parallel_shard_degree > 1"
        )


def float8_eligible(module: nn.Module, fqn: str, filter_fqns: list[str]) -> bool:
    """A linear that float8 matmuls can run: not filtered out, both dims multiples of 16."""
    if not isinstance(module, nn.Linear) or any(f in fqn for f in filter_fqns):
        return False
    return (
        module.in_features % FLOAT8_DIM_MULTIPLE == 0
        and module.out_features % FLOAT8_DIM_MULTIPLE == 0
    )


def convert_to_float8(model: nn.Module, cfg: Float8Config, device: torch.device) -> list[str]:
    """Swap the eligible linears of `model` for `Float8Linear` in place; returns their names.

    Call on the meta model, before tensor parallel and FSDP2 are applied.
    """
    if not cfg.enable_float8_linear:
        return []
    emulate = cfg.emulate or device.type != "cuda"
    if not emulate:
        _check_float8_gpu(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if cfg.recipe_name == "tensorwise":
        config = Float8LinearConfig(
            enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather, emulate=emulate
        )
    else:
        config = replace(Float8LinearConfig.from_recipe_name(cfg.recipe_name), emulate=emulate)
    converted: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        if float8_eligible(module, fqn, cfg.filter_fqns):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return converted


def gathers_in_float8(module: nn.Module) -> bool:
    """Whether FSDP2 all-gathers this module's weight as float8 (1 byte per element)."""
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear) and module.config.enable_fsdp_float8_all_gather


def _check_float8_gpu(device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"float8.enable_float8_linear needs a GPU of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper, Blackwell); {name} has "
            f"{capability[0]}.{capability[1]}. Set float8.enable_float8_linear = false to train "
            "in bf16, or float8.emulate = true to check float8 numerics (slower than bf16)"
        )
