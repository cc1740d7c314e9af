"""FLOPs per step, and the step time and MFU that a stated per-GPU peak implies.

Model FLOPs are PaLM's 6·N + attention (metrics/flops.py), the convention MFU is quoted in.
The hardware also re-runs the forward of fully checkpointed blocks, and a pipeline idles for
its bubble; both lower the best MFU reachable. Communication is assumed to overlap compute.
"""

from dataclasses import asdict, dataclass

from arbor_titan.config.job import JobConfig
from arbor_titan.distributed.parallel_dims import MULTI_STAGE_SCHEDULES, ParallelDims
from arbor_titan.distributed.pipeline import stages_per_rank
from arbor_titan.metrics.flops import GPU_PEAKS, GpuPeak, flops_per_token
from arbor_titan.models.arbor import ArborArgs

DEFAULT_GPU = "H100 SXM"


@dataclass(frozen=True)
class StepCost:
    tokens_per_step: int
    model_flops_per_step: float  # all ranks together
    recompute_flops_per_step: float
    pipeline_bubble: float  # fraction of a step a pipeline rank idles
    peak_flops: float  # per GPU
    peak_source: str
    ideal_step_seconds: float  # every matmul at peak, recompute and bubble included
    mfu_ceiling: float
    assumed_mfu: float
    step_seconds: float  # at assumed_mfu
    tokens_per_second: float  # at assumed_mfu, whole job

    def as_dict(self) -> dict:
        return asdict(self)


def gpu_peak(name: str, compute_dtype: str) -> tuple[float, str]:
    """Dense peak FLOP/s of the metrics table's GPU that `--gpu` names (see `match_gpu`)."""
    gpu = match_gpu(name)
    peak = gpu.bf16 if compute_dtype == "bfloat16" else gpu.tf32
    kind = "bf16" if compute_dtype == "bfloat16" else "tf32"
    return peak, f"{gpu.label} table, {kind} dense"


def match_gpu(name: str) -> GpuPeak:
    """The table's GPU for `--gpu`: the one whose label it is (with or without 'NVIDIA'), else
    the one whose label holds all of its words; where several do, the SXM part, which is what
    a bare model name means (`nvidia-smi` calls the H200 SXM just 'NVIDIA H200')."""
    wanted = _label_words(name)
    gpus = [gpu for _, gpu in GPU_PEAKS]
    exact = [gpu for gpu in gpus if _label_words(gpu.label) == wanted]
    matches = exact or [gpu for gpu in gpus if set(wanted) <= set(_label_words(gpu.label))]
    if len(matches) > 1:
        matches = [gpu for gpu in matches if "sxm" in _label_words(gpu.label)] or matches
    if len(matches) == 1:
        return matches[0]
    what = "several known GPUs" if matches else "no known GPU"
    labels = ", ".join(gpu.label.removeprefix("NVIDIA ") for gpu in gpus)
    raise ValueError(f"--gpu {name!r} matches {what}; known: {labels} (or pass --peak-tflops)")


def _label_words(label: str) -> list[str]:
    words = label.lower().split()
    return words[1:] if words[:1] == ["nvidia"] else words


def pipeline_bubble(cfg: JobConfig, dims: ParallelDims, microbatches: int) -> float:
    """Idle fraction of (p-1)/(v·m + p-1) for p ranks, v stages per rank, m micro-batches
    (Narayanan et al. 2021); zero-bubble schedules do better, so it bounds them from above."""
    if dims.pp == 1:
        return 0.0
    schedule = cfg.parallelism.pipeline_parallel_schedule
    per_rank = stages_per_rank(cfg.parallelism) if schedule in MULTI_STAGE_SCHEDULES else 1
    return (dims.pp - 1) / (per_rank * microbatches + dims.pp - 1)


def step_cost(
    cfg: JobConfig,
    dims: ParallelDims,
    args: ArborArgs,
    num_params: int,
    num_embedding_params: int,
    block_ac: list[str],
    microbatches: int,
    peak: tuple[float, str],
    assumed_mfu: float,
) -> StepCost:
    """`block_ac` lists every layer's checkpointing mode (none, full, op) across all stages."""
    training = cfg.training
    tokens = (
        training.local_batch_size
        * training.seq_len
        * training.gradient_accumulation_steps
        * dims.dp
    )
    per_token = flops_per_token(
        num_params,
        num_embedding_params,
        args.n_layers,
        args.n_heads,
        args.head_dim,
        training.seq_len,
    )
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    block_matmul_params = args.dim * (2 * q_dim + 2 * kv_dim) + 3 * args.dim * args.ffn_dim
    # A fully checkpointed block re-runs its forward: 2 FLOPs per weight, 4·H·Q·T attention.
    # Selective "op" mode keeps matmul and attention outputs, so it recomputes no matmul.
    block_forward = 2 * block_matmul_params + 4 * args.n_heads * args.head_dim * training.seq_len
    recompute = block_ac.count("full") * block_forward * tokens
    model = per_token * tokens
    bubble = pipeline_bubble(cfg, dims, microbatches)
    peak_flops, peak_source = peak
    ideal = (model + recompute) / dims.world_size / peak_flops / (1 - bubble)
    step_seconds = model / dims.world_size / (peak_flops * assumed_mfu)
    return StepCost(
        tokens_per_step=tokens,
        model_flops_per_step=float(model),
        recompute_flops_per_step=float(recompute),
        pipeline_bubble=bubble,
        peak_flops=peak_flops,
        peak_source=peak_source,
        ideal_step_seconds=ideal,
        mfu_ceiling=model / dims.world_size / (ideal * peak_flops),
        assumed_mfu=assumed_mfu,
        step_seconds=step_seconds,
        tokens_per_second=tokens / step_seconds,
    )
