"""Per-GPU memory of one rank at its peak, by category, from what the simulated build holds.

Parameters, gradients and optimizer states are exact: the sums of this rank's local shards (fp32
under FSDP2 mixed precision, which keeps fp32 sharded parameters and gathers compute-dtype
copies). The rest follow FSDP2's and the pipeline schedules' buffer rules in torch 2.13:

- FSDP2 gathers a block's weights before its forward and backward and prefetches the next, so
  at the start of backward it holds the root unit, the last block, the block being prefetched
  and that block's flat all-gather buffer. Under pipeline parallelism (default
  `fsdp_reshard_after_forward`) blocks stay gathered between micro-batches: all of them.
- Gradients leave autograd unsharded in the compute dtype and are reduce-scattered in the reduce
  dtype; two blocks are in flight. Under pipeline parallelism torch's stages disable gradient
  sync until the last micro-batch, so every local unsharded gradient accumulates in the reduce
  dtype.
- Pipeline stages keep one receive buffer per micro-batch for activations and for gradients.
"""

from dataclasses import asdict, dataclass, field

from arbor_titan.config.job import JobConfig
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.distributed.parallelize import reshards_after_forward
from arbor_titan.estimate.activations import ActivationModel, peak_in_flight
from arbor_titan.estimate.ranks import RankBuild, ShardUnit

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, each shaped like the parameter shard
ADAM_STEP_BYTES = 4  # AdamW's per-parameter `step`, an fp32 scalar tensor
FLOAT8_BYTES = 1


@dataclass
class MemoryEstimate:
    """Bytes per category at the rank's peak; `in_flight` is micro-batches held per stage."""

    parameters: int
    gradients: int
    optimizer: int
    gathered_weights: int
    gradient_buffers: int
    pipeline_buffers: int
    activations: int
    backward_working: int
    reserve: int
    capacity: int
    in_flight: dict[int, int] = field(default_factory=dict)

    CATEGORIES = (
        "parameters",
        "gradients",
        "optimizer",
        "gathered_weights",
        "gradient_buffers",
        "pipeline_buffers",
        "activations",
        "backward_working",
        "reserve",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.CATEGORIES)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


@dataclass(frozen=True)
class MemoryOptions:
    """Hardware assumptions of the estimate."""

    capacity_gib: float = 80.0
    # CUDA context (~0.5 GiB), NCCL buffers of the dp/tp/pp communicators (~1-2 GiB) and
    # caching-allocator fragmentation; a measurement on your own cluster beats this default.
    reserve_gib: float = 4.0
    device: str = "cuda"  # the kernels whose saved tensors are counted (fused RMSNorm on cuda)


def activation_model(
    build: RankBuild, cfg: JobConfig, dims: ParallelDims, device: str
) -> ActivationModel:
    """The per-micro-batch activation model of this rank's numerics and layout."""
    training = cfg.training
    compute = DTYPE_BYTES[training.mixed_precision_param]
    autocast = compute < 4 and not dims.fsdp_enabled
    batch = training.local_batch_size // build.microbatches
    local_len = training.seq_len // dims.cp  # context parallel splits each sequence
    seq_tokens = -(-local_len // dims.tp)  # sequence parallel shards the sequence
    loss_parallel = dims.tp > 1 and cfg.parallelism.enable_loss_parallel
    return ActivationModel(
        args=build.args,
        tokens=batch * local_len,
        seq_tokens=batch * seq_tokens,
        tp=dims.tp,
        compute_bytes=compute,
        residual_bytes=4 if autocast else compute,
        autocast=autocast,
        fused_norm=device == "cuda",
        vocab_shards=dims.tp if loss_parallel else 1,
        cp=dims.cp,
        loss_chunk_tokens=batch * training.loss_chunk_len,
        micro_batch=batch,
        ring_attention=cfg.parallelism.context_parallel_attention == "torch_ring",  # cp > 1
    )


def estimate_memory(
    build: RankBuild, cfg: JobConfig, dims: ParallelDims, options: MemoryOptions
) -> MemoryEstimate:
    """The peak memory of the simulated rank `build`."""
    compute = DTYPE_BYTES[cfg.training.mixed_precision_param]
    reduce = DTYPE_BYTES[cfg.training.mixed_precision_reduce]
    acts = activation_model(build, cfg, dims, options.device)
    stage_bytes = {}
    for stage in build.stages:
        held = acts.rope() + sum(acts.block(mode) for mode in stage.block_ac)
        held += acts.embedding() if stage.has_embedding else 0
        held += acts.head() if stage.has_head else acts.stage_output()
        stage_bytes[stage.stage_id] = held
    activations, in_flight = peak_in_flight(build.actions, stage_bytes)
    working = max(acts.block_backward_working(m) for s in build.stages for m in s.block_ac)
    if any(stage.has_head for stage in build.stages):
        working = max(working, acts.loss_backward_working())
    gathered, gradient_buffers = _fsdp_buffers(build.units, cfg, dims, compute, reduce)
    if acts.autocast:
        gathered = build.autocast_numel * compute  # autocast's cached weight casts
    return MemoryEstimate(
        parameters=build.local_param_bytes,
        gradients=build.local_param_bytes,
        optimizer=ADAM_MOMENTS * build.local_param_bytes
        + ADAM_STEP_BYTES * build.local_param_tensors,
        gathered_weights=gathered,
        gradient_buffers=gradient_buffers,
        pipeline_buffers=_pipeline_buffers(build, acts.stage_output()),
        activations=activations,
        backward_working=working,
        reserve=int(options.reserve_gib * GIB),
        capacity=int(options.capacity_gib * GIB),
        in_flight=in_flight,
    )


def _fsdp_buffers(
    units: list[ShardUnit], cfg: JobConfig, dims: ParallelDims, compute: int, reduce: int
) -> tuple[int, int]:
    """(gathered weights, unsharded gradient buffers) of FSDP2; (0, 0) without it."""
    if not dims.fsdp_enabled:
        return 0, 0

    def gathered(unit: ShardUnit) -> int:
        plain = unit.gathered_numel - unit.gathered_float8_numel
        return plain * compute + unit.gathered_float8_numel * FLOAT8_BYTES

    blocks = [u for u in units if u.name != "root"]
    roots = [u for u in units if u.name == "root"]
    biggest = max(blocks, key=lambda u: u.gathered_numel)
    reshard = reshards_after_forward(cfg.parallelism, dims)
    staging = gathered(biggest)
    if reshard:
        weights = sum(map(gathered, roots)) + 2 * gathered(biggest) + staging
    else:
        weights = sum(map(gathered, units)) + staging
    if dims.pp > 1:
        grads = sum(u.gathered_numel for u in units) * reduce + biggest.gathered_numel * reduce
    else:
        root_grads = sum(u.gathered_numel for u in roots) * compute  # reduced last
        grads = root_grads + biggest.gathered_numel * (2 * compute + reduce)
    return weights, grads


def _pipeline_buffers(build: RankBuild, per_microbatch: int) -> int:
    """Receive buffers: activations into every stage but the first, gradients into every stage
    but the last, one per micro-batch each."""
    if not build.pipelined:
        return 0
    directions = sum((not s.has_embedding) + (not s.has_head) for s in build.stages)
    return directions * build.microbatches * per_microbatch
