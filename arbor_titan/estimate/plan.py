"""Plan a config without training it: simulate a sample of its ranks, estimate each one's memory
and the step's cost, and check that the shards add up to the whole model."""

import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from arbor_titan.config.job import JobConfig
from arbor_titan.context import build_context_schedule
from arbor_titan.distributed.parallel_dims import GPUS_PER_NODE, ParallelDims, ParallelismConfig
from arbor_titan.estimate.memory import MemoryEstimate, MemoryOptions, estimate_memory
from arbor_titan.estimate.ranks import RankBuild, sample_ranks, simulate_rank
from arbor_titan.estimate.throughput import DEFAULT_GPU, StepCost, gpu_peak, step_cost
from arbor_titan.models.arbor import FLAVORS, resolve_args
from arbor_titan.registry import load_plugins

if TYPE_CHECKING:
    from arbor_titan.estimate.context_fit import CpFit


@dataclass(frozen=True)
class EstimateOptions:
    """What the planner assumes beyond the config."""

    world_size: int | None = None  # required when data_parallel_shard_degree = -1
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    gpu: str = DEFAULT_GPU
    peak_tflops: float | None = None  # overrides the GPU table
    assumed_mfu: float = 0.4
    ranks: str = "sample"  # sample, all, or comma-separated rank numbers
    vocab_size: int | None = None  # overrides the tokenizer file / flavor


@dataclass(frozen=True)
class PlannedLength:
    """The shape a plan is made at: `config` carries it as `training.seq_len` and
    `training.local_batch_size`; `lengths` are every sequence length a run of the config trains
    or validates at (context parallelism must split each into 2·cp chunks)."""

    config: JobConfig
    source: str  # where the length came from, for the report
    lengths: tuple[int, ...]


def planned_length(cfg: JobConfig, seq_len: int | None = None) -> PlannedLength:
    """`cfg` at `--seq-len` when given (the [training] micro-batch), else at its `[context]`
    schedule's longest stage, the run's longest sequences (ties: the largest micro-batch)."""
    validation = (cfg.validation.seq_len,) if cfg.validation.seq_len else ()
    training = cfg.training
    if seq_len is not None:
        config = replace(cfg, training=replace(training, seq_len=seq_len))
        return PlannedLength(config, "--seq-len", (seq_len, *validation))
    load_plugins(cfg.plugins.modules)  # a schedule may come from a plugin module
    schedule = build_context_schedule(cfg.context, training.seq_len, training.local_batch_size)
    shapes = schedule.shapes()
    longest = max(shapes, key=lambda shape: (shape.seq_len, shape.local_batch_size))
    lengths = (*sorted({shape.seq_len for shape in shapes}), *validation)
    if (longest.seq_len, longest.local_batch_size) == (training.seq_len, training.local_batch_size):
        return PlannedLength(cfg, "training.seq_len", lengths)
    at_longest = replace(
        training, seq_len=longest.seq_len, local_batch_size=longest.local_batch_size
    )
    source = (
        f"the longest stage of context.schedule {cfg.context.schedule!r} (training.seq_len "
        f"{training.seq_len:,} × local_batch_size {training.local_batch_size})"
    )
    return PlannedLength(replace(cfg, training=at_longest), source, lengths)


@dataclass
class RankPlan:
    build: RankBuild
    memory: MemoryEstimate


@dataclass
class Plan:
    config: JobConfig
    dims: ParallelDims
    world_source: str
    vocab_source: str
    ranks: list[RankPlan]
    sharded_params: int  # the stages' parameters summed over pipeline ranks
    step: StepCost
    seconds_per_rank: float
    peak_rss_mib: float
    length_source: str = "training.seq_len"  # PlannedLength.source
    cp_fit: "CpFit | None" = None  # the smallest cp that fits, when searched

    @property
    def num_params(self) -> int:
        return self.ranks[0].build.num_params

    @property
    def fits(self) -> bool:
        return all(r.memory.fits for r in self.ranks)

    @property
    def params_add_up(self) -> bool:
        return self.sharded_params == self.num_params


def planned_world_size(cfg: ParallelismConfig, world_size: int | None) -> tuple[int, str]:
    """The world size a config is planned for, and where that number came from."""
    if world_size is not None:
        return world_size, "--world-size"
    fixed = (
        cfg.data_parallel_replicate_degree
        * cfg.context_parallel_degree
        * cfg.tensor_parallel_degree
        * cfg.pipeline_parallel_degree
    )
    if cfg.data_parallel_shard_degree == -1:
        # dp_shard -1 takes whatever world it is launched on; plan the smallest one.
        return fixed, "data_parallel_shard_degree -1 with no --world-size: dp_shard 1"
    return fixed * cfg.data_parallel_shard_degree, "the config's degrees"


def layout_text(dims: ParallelDims) -> str:
    """`pp 16 × dp_replicate 1 × dp_shard 4 × cp 1 × tp 8 = 512 ranks (64 nodes × 8 GPUs)`."""
    nodes, rest = divmod(dims.world_size, GPUS_PER_NODE)
    where = f"{nodes} node{'s' if nodes > 1 else ''} × {GPUS_PER_NODE} GPUs"
    where = where if nodes and not rest else "one node"
    return (
        f"pp {dims.pp} × dp_replicate {dims.dp_replicate} × dp_shard {dims.dp_shard} × "
        f"cp {dims.cp} × tp {dims.tp} = {dims.world_size} "
        f"rank{'s' if dims.world_size > 1 else ''} ({where})"
    )


def plan_vocab(cfg: JobConfig, override: int | None) -> tuple[int, str]:
    """The vocabulary a run would have, without training a tokenizer: an existing tokenizer
    file's, else the flavor's intended one."""
    if override is not None:
        return override, "--vocab-size"
    path = Path(cfg.tokenizer.path)
    if cfg.tokenizer.path and path.is_file():
        from arbor_titan.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path, cfg.tokenizer.bos_token, cfg.tokenizer.eos_token)
        return tokenizer.vocab_size, f"tokenizer {path}"
    vocab_size, source = FLAVORS[cfg.model.flavor].vocab_size, f"flavor {cfg.model.flavor}"
    if not cfg.tokenizer.path and cfg.tokenizer.vocab_size != vocab_size:
        source += f"; a run would train a tokenizer of {cfg.tokenizer.vocab_size}"
    return vocab_size, source


def ranks_to_simulate(option: str, dims: ParallelDims) -> list[int]:
    if option == "sample":
        return sample_ranks(dims)
    if option == "all":
        return list(range(dims.world_size))
    ranks = sorted({int(r) for r in option.split(",")})
    bad = [r for r in ranks if not 0 <= r < dims.world_size]
    if bad:
        raise ValueError(f"--ranks {bad} outside the world of {dims.world_size} ranks")
    return ranks


def plan(cfg: JobConfig, options: EstimateOptions) -> Plan:
    """Simulate the chosen ranks of `cfg` and estimate memory and step cost for each."""
    resolve_args(cfg.model)  # a clear error for an unknown flavor before anything else
    world_size, world_source = planned_world_size(cfg.parallelism, options.world_size)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    vocab_size, vocab_source = plan_vocab(cfg, options.vocab_size)
    start = time.perf_counter()
    ranks = []
    for rank in ranks_to_simulate(options.ranks, dims):
        build = simulate_rank(cfg, rank, world_size, vocab_size)
        ranks.append(RankPlan(build, estimate_memory(build, cfg, dims, options.memory)))
    seconds_per_rank = (time.perf_counter() - start) / len(ranks)
    stage_numel = {r.build.coordinate["pp"]: r.build.stage_numel for r in ranks}
    block_ac = {
        layer: mode
        for r in ranks
        for stage in r.build.stages
        for layer, mode in zip(stage.layers, stage.block_ac)
    }
    first = ranks[0].build
    peak = (
        (options.peak_tflops * 1e12, "--peak-tflops")
        if options.peak_tflops is not None
        else gpu_peak(options.gpu, cfg.training.mixed_precision_param)
    )
    step = step_cost(
        cfg,
        dims,
        first.args,
        first.num_params,
        first.num_embedding_params,
        list(block_ac.values()),
        first.microbatches,
        peak,
        options.assumed_mfu,
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Plan(
        config=cfg,
        dims=dims,
        world_source=world_source,
        vocab_source=vocab_source,
        ranks=ranks,
        # Only complete when every pipeline rank was simulated (the sample always does).
        sharded_params=sum(stage_numel.values()) if len(stage_numel) == dims.pp else -1,
        step=step,
        seconds_per_rank=seconds_per_rank,
        peak_rss_mib=rss / 2**20 if sys.platform == "darwin" else rss / 1024,
    )
