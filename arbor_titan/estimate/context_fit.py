"""The smallest context-parallel degree whose plan fits the GPU.

Every other degree stays as the config writes it, as TorchTitan reads explicit degrees: raising
cp grows the world by cp's factor and a step keeps its sequences. A `data_parallel_shard_degree`
of -1 planned for a `--world-size` keeps that world instead: cp takes its ranks from dp_shard
(fewer sequences a step). The candidates are the degrees that cut every length a run trains or
validates at into 2·cp chunks (a head and a tail a rank) and leave each rank at least
`MIN_TOKENS_PER_CP_RANK` tokens of the planned length: below that a rank's attention is too
short to hide the K/V all-gather.

Peak memory never grows with cp: parameters, gradients and optimizer states shard over
dp_shard × cp (or keep their shard at a fixed world), every activation term shrinks as 1/cp
except the K/V, whose local and gathered parts together stay the whole sequence's. So a bisection
over the candidates finds the smallest that fits, planning a few layouts (one more when the
configured degree is the smallest or its next candidate is), each on the ranks the configured
plan simulates (`--ranks`, the sample by default): a candidate fits when its own dry run says so.
"""

from dataclasses import dataclass, replace

from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import ConfigError
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.estimate.plan import EstimateOptions, Plan, plan

MIN_TOKENS_PER_CP_RANK = 1024


@dataclass(frozen=True)
class CpTrial:
    """One planned cp degree: its layout and its fullest rank's bytes."""

    dims: ParallelDims
    peak: int

    @property
    def cp(self) -> int:
        return self.dims.cp


@dataclass(frozen=True)
class CpFit:
    """The search's answer around the configured degree.

    `smallest` fits and `below` (the next smaller candidate, None when there is none) does not;
    when no candidate fits, `smallest` is None and `largest` is the largest candidate tried
    (None when none is larger than the configured degree, which does not fit).
    """

    configured: CpTrial
    capacity: int
    keeps_world: bool
    limit: str  # why the candidates stop where they do
    smallest: CpTrial | None = None
    below: CpTrial | None = None
    largest: CpTrial | None = None

    def as_dict(self) -> dict:
        def trial(t: CpTrial | None) -> dict | None:
            if t is None:
                return None
            return {"cp": t.cp, "dp_shard": t.dims.dp_shard, "world_size": t.dims.world_size,
                    "peak_bytes": t.peak}  # fmt: skip

        return {
            "configured_cp": self.configured.cp,
            "keeps_world": self.keeps_world,
            "limit": self.limit,
            "smallest": trial(self.smallest),
            "below": trial(self.below),
            "largest_tried": trial(self.largest),
        }


def cp_candidates(
    lengths: tuple[int, ...], planned_len: int, free_ranks: int | None
) -> tuple[list[int], str]:
    """The cp degrees a run can take, ascending, and the rule that bounds them. `free_ranks`:
    the ranks cp and dp_shard share at a fixed world (None: the world follows cp)."""
    most = max(planned_len // MIN_TOKENS_PER_CP_RANK, 1)
    candidates = [
        cp
        for cp in range(1, most + 1)
        if cp == 1 or all(length % (2 * cp) == 0 for length in lengths)
        if free_ranks is None or free_ranks % cp == 0
    ]
    limit = (
        f"2·cp dividing the length(s) {', '.join(f'{n:,}' for n in lengths)}, at least "
        f"{MIN_TOKENS_PER_CP_RANK:,} of the {planned_len:,} tokens a rank"
    )
    if free_ranks is not None:
        limit += f", cp dividing the {free_ranks} ranks it shares with dp_shard"
    return candidates, limit


def check_cp_splits(cp: int, lengths: tuple[int, ...]) -> None:
    """The configured degree cuts every length into 2·cp chunks, as training requires; else a
    ConfigError naming the degrees that do."""
    bad = [length for length in lengths if length % (2 * cp)]
    if cp > 1 and bad:
        splits = [c for c in range(2, min(lengths) + 1) if all(n % (2 * c) == 0 for n in lengths)]
        raise ConfigError(
            f"parallelism.context_parallel_degree={cp}: sequence length {bad[0]:,} is not "
            f"divisible by 2 × {cp} (each cp rank holds a head and a tail chunk of every "
            f"sequence); degrees that split every length ({', '.join(map(str, lengths))}): "
            + ", ".join(map(str, [1, *splits]))
        )


def _peak(result: Plan) -> int:
    return max(rank.memory.total for rank in result.ranks)


def with_cp(cfg: JobConfig, cp: int) -> JobConfig:
    """`cfg` at context parallel degree `cp` (at cp 1 the attention is the plain one)."""
    par = cfg.parallelism
    attention = par.context_parallel_attention if cp > 1 else "all_gather"
    return replace(
        cfg,
        parallelism=replace(par, context_parallel_degree=cp, context_parallel_attention=attention),
    )


def smallest_fitting_cp(
    cfg: JobConfig, options: EstimateOptions, result: Plan, lengths: tuple[int, ...]
) -> CpFit | None:
    """Search the smallest cp whose plan of `cfg` fits, `result` being `cfg`'s own plan under
    `options` (the candidates' too); None when `cfg` fits at cp 1 (nothing to search)."""
    dims = result.dims
    if result.fits and dims.cp == 1:
        return None
    keeps_world = (
        cfg.parallelism.data_parallel_shard_degree == -1 and options.world_size is not None
    )
    free_ranks = dims.dp_shard * dims.cp if keeps_world else None
    candidates, limit = cp_candidates(lengths, cfg.training.seq_len, free_ranks)
    configured = CpTrial(dims, _peak(result))
    # The configured degree is known: search below it when it fits, above it when not.
    side = [cp for cp in candidates if (cp < dims.cp if result.fits else cp > dims.cp)]
    ladder = sorted([*side, dims.cp])
    tried = {dims.cp: configured}
    candidate_options = replace(options, world_size=options.world_size if keeps_world else None)

    def trial(cp: int) -> CpTrial:
        if cp not in tried:
            candidate = plan(with_cp(cfg, cp), candidate_options)
            tried[cp] = CpTrial(candidate.dims, _peak(candidate))
        return tried[cp]

    capacity = result.ranks[0].memory.capacity
    fit = CpFit(configured, capacity, keeps_world, limit)
    if trial(ladder[-1]).peak > capacity:
        return replace(fit, largest=tried[ladder[-1]] if len(ladder) > 1 else None)
    low, high = 0, len(ladder) - 1
    # The configured degree's neighbour first: a tuned config is settled by one more plan.
    probe: int | None = high - 1 if result.fits else 1
    while low < high:
        middle, probe = (low + high) // 2 if probe is None else probe, None
        if trial(ladder[middle]).peak <= capacity:
            high = middle
        else:
            low = middle + 1
    below = tried[ladder[low - 1]] if low else None
    return replace(fit, smallest=tried[ladder[low]], below=below)
