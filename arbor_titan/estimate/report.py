"""A plan as a readable report and as JSON (the same numbers, in bytes and FLOPs)."""

from arbor_titan.distributed.pipeline import stages_per_rank
from arbor_titan.estimate.context_fit import CpFit, CpTrial
from arbor_titan.estimate.memory import GIB, MemoryEstimate
from arbor_titan.estimate.plan import Plan, layout_text
from arbor_titan.estimate.ranks import RankBuild
from arbor_titan.models.arbor.parallelize import local_kv_heads, replicates_kv

MEMORY_COLUMNS = (
    ("param", "parameters"),
    ("grad", "gradients"),
    ("optim", "optimizer"),
    ("gather", "gathered_weights"),
    ("gradbuf", "gradient_buffers"),
    ("pipebuf", "pipeline_buffers"),
    ("act", "activations"),
    ("work", "backward_working"),
    ("reserve", "reserve"),
)
MEMORY_NOTES = """\
param/grad/optim: fp32 shards of this rank (AdamW: 2 moments + step) - exact
gather: FSDP-gathered compute-dtype (float8 with fp8 all-gather) weights in flight, or autocast's
  cached weight casts; gradbuf: unsharded gradients (reduce-scatter staging; under PP accumulated
  over all micro-batches); pipebuf: per-micro-batch p2p receive buffers
act: activations held at the schedule's peak (in-flight micro-batches per stage in brackets);
  work: backward's working set (recompute of a checkpointed block, or the loss gradient)"""


def _layers(build: RankBuild) -> str:
    return ", ".join(f"{s.layers.start}-{s.layers.stop - 1}" for s in build.stages)


def _shape(shape: tuple[int, ...]) -> str:
    return " × ".join(str(n) for n in shape)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _in_flight(memory: MemoryEstimate) -> str:
    return " ".join(f"s{stage}:{count}" for stage, count in sorted(memory.in_flight.items()))


def format_plan(plan: Plan, config_path: str) -> str:
    """The human-readable report."""
    cfg, dims, first = plan.config, plan.dims, plan.ranks[0].build
    args, par, train = first.args, cfg.parallelism, cfg.training
    lines = [f"arbor_titan dry run: {config_path}", ""]
    lines.append(
        f"model      {cfg.model.name}/{cfg.model.flavor}: {plan.num_params:,} parameters "
        f"({args.n_layers} layers, dim {args.dim}, {args.n_heads} heads, {args.n_kv_heads} kv "
        f"heads, ffn {args.ffn_dim}, vocab {args.vocab_size} from {plan.vocab_source})"
    )
    lines.append(f"layout     {layout_text(dims)}; world size from {plan.world_source}")
    if replicates_kv(args.n_kv_heads, dims.tp):
        projected, attended = local_kv_heads(args.n_heads, args.n_kv_heads, dims.tp)
        lines.append(
            f"kv heads   tp {dims.tp} does not divide the {args.n_kv_heads} kv heads: wk/wv are "
            f"replicated over tp, each rank projects the {projected} kv heads its {attended} "
            "query heads read"
        )
    batch = train.local_batch_size // first.microbatches
    if dims.pp > 1:
        per_rank = stages_per_rank(par)
        lines.append(
            f"pipeline   {par.pipeline_parallel_schedule}, {per_rank} stage(s) per rank, "
            f"{dims.pp * per_rank} stages, {first.microbatches} micro-batches of "
            f"{batch} × {train.seq_len} tokens"
        )
    if plan.length_source != "training.seq_len":
        lines.append(
            f"length     {train.seq_len:,} tokens × local_batch_size {train.local_batch_size}, "
            f"from {plan.length_source}"
        )
    if dims.cp > 1:
        lines.append(
            f"context    {train.seq_len:,} tokens a sequence over {dims.cp} cp ranks: "
            f"{train.seq_len // dims.cp:,} each (a head and a tail chunk), K/V all-gathered"
        )
    float8 = cfg.float8
    f8 = (
        f"float8 linears ({float8.recipe_name}"
        f"{', fp8 all-gather' if float8.enable_fsdp_float8_all_gather else ''})"
        if float8.enable_float8_linear
        else "no float8"
    )
    ac = cfg.activation_checkpoint
    ac_text = ac.mode if ac.mode != "selective" else f"selective {ac.selective_ac_option}"
    lines.append(
        f"numerics   {train.mixed_precision_param} compute / {train.mixed_precision_reduce} "
        f"reduce, {f8}, activation checkpointing {ac_text}, compile "
        f"{'on' if cfg.compile.enable else 'off'}"
    )
    check = "= count_params ✓" if plan.params_add_up else f"≠ count_params {plan.num_params:,} ✗"
    if plan.sharded_params < 0:
        check = "(not every pipeline rank simulated)"
    lines.append(
        f"check      parameters summed over the {dims.pp} pipeline rank(s)' stages: "
        f"{plan.sharded_params:,} {check}"
    )
    lines.append(
        f"simulated  {len(plan.ranks)} rank(s), {plan.seconds_per_rank:.2f} s each on a fake "
        f"process group; peak RSS {plan.peak_rss_mib:.0f} MiB"
    )
    lines += ["", *_shard_table(plan), "", *_memory_table(plan), "", *_step_lines(plan)]
    return "\n".join(lines)


def _shard_table(plan: Plan) -> list[str]:
    weights = {}
    for rank in plan.ranks:
        for kind, shard in rank.build.weights.items():
            weights.setdefault(kind, shard)
    rows = [
        (
            kind,
            _shape(w.global_shape),
            _shape(w.local_shape),
            w.dtype + (" fp8" if w.float8 else ""),
            w.placements,
        )
        for kind, w in weights.items()
    ]
    header = ("weight", "global shape", "local shard", "dtype", "placements")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["Weight shards (local = this rank's piece)", fmt.format(*header)] + [
        fmt.format(*row) for row in rows
    ]


def _memory_table(plan: Plan) -> list[str]:
    capacity = plan.ranks[0].memory.capacity
    head = f"{'rank':>5} {'pp':>3} {'dp':>3} {'cp':>3} {'tp':>3}  {'layers':<14} {'params':>14}"
    head += "".join(f" {label:>7}" for label, _ in MEMORY_COLUMNS) + f" {'total':>7}  fits"
    lines = [f"Per-GPU memory, GiB (capacity {_gib(capacity)})", head]
    for rank in plan.ranks:
        build, memory = rank.build, rank.memory
        coord = build.coordinate
        dp = coord["dp_replicate"] * plan.dims.dp_shard + coord["dp_shard"]
        row = (
            f"{build.rank:>5} {coord['pp']:>3} {dp:>3} {coord['cp']:>3} {coord['tp']:>3}  "
            f"{_layers(build):<14} {build.local_numel:>14,}"
        )
        row += "".join(f" {_gib(getattr(memory, field)):>7}" for _, field in MEMORY_COLUMNS)
        row += f" {_gib(memory.total):>7}  {'yes' if memory.fits else 'NO'}"
        if memory.in_flight and plan.dims.pp > 1:
            row += f"  [{_in_flight(memory)}]"
        lines.append(row)
    return [*lines, MEMORY_NOTES]


def _step_lines(plan: Plan) -> list[str]:
    step = plan.step
    worst = max(plan.ranks, key=lambda r: r.memory.total)
    verdict = (
        f"all {len(plan.ranks)} simulated ranks fit; the fullest, rank {worst.build.rank}, "
        f"needs {_gib(worst.memory.total)} GiB"
        if plan.fits
        else f"DOES NOT FIT: rank {worst.build.rank} needs {_gib(worst.memory.total)} GiB > "
        f"{_gib(worst.memory.capacity)} GiB"
    )
    return [
        f"step       {step.tokens_per_step:,} tokens; {step.model_flops_per_step:.3e} model "
        f"FLOPs + {step.recompute_flops_per_step:.3e} recompute; pipeline bubble "
        f"{step.pipeline_bubble:.1%}",
        f"           at {step.peak_flops / 1e12:.1f} TFLOP/s per GPU ({step.peak_source}): "
        f"≥ {step.ideal_step_seconds:.3g} s/step, MFU ceiling {step.mfu_ceiling:.1%}",
        f"           at {step.assumed_mfu:.0%} MFU: {step.step_seconds:.2f} s/step, "
        f"{step.tokens_per_second:,.0f} tokens/s, "
        f"{step.tokens_per_second * 86400 / 1e9:.3g} B tokens/day",
        f"verdict    {verdict}",
        *([f"cp needed  {_cp_fit_text(plan.cp_fit)}"] if plan.cp_fit else []),
    ]


def _needs(trial: CpTrial) -> str:
    return f"cp {trial.cp} needs {_gib(trial.peak)} GiB"


def _cp_fit_text(fit: CpFit) -> str:
    """`cp 16 fits (pp 1 × ... = 128 ranks (16 nodes × 8 GPUs), 71.30 GiB); cp 8 needs ...`."""
    configured, capacity = fit.configured, _gib(fit.capacity)
    kept = (
        f"the world of {configured.dims.world_size} ranks kept: cp takes ranks from dp_shard"
        if fit.keeps_world
        else "the other degrees kept: the world follows cp"
    )
    if fit.smallest is None:
        if fit.largest is None:
            return f"no cp above {configured.cp} to try (candidates: {fit.limit})"
        return (
            f"no cp fits {capacity} GiB: {_needs(fit.largest)}, the largest candidate "
            f"({fit.limit}); {kept}"
        )
    below = f"; {_needs(fit.below)} > {capacity} GiB" if fit.below else ""
    if fit.smallest.cp == configured.cp:
        return f"cp {configured.cp} is the smallest that fits{below}"
    verb = "is the smallest that fits" if fit.smallest.cp < configured.cp else "fits"
    return (
        f"cp {fit.smallest.cp} {verb} ({layout_text(fit.smallest.dims)}, "
        f"{_gib(fit.smallest.peak)} GiB){below}; {kept}"
    )


def plan_json(plan: Plan, config_path: str) -> dict:
    """Every number of the report, in bytes and FLOPs."""
    return {
        "config": config_path,
        "model": {
            "flavor": plan.config.model.flavor,
            "num_params": plan.num_params,
            "sharded_params": plan.sharded_params,
            "params_add_up": plan.params_add_up,
            "vocab_source": plan.vocab_source,
            **{k: getattr(plan.ranks[0].build.args, k) for k in ("n_layers", "dim", "vocab_size")},
        },
        "layout": {
            "pp": plan.dims.pp,
            "dp_replicate": plan.dims.dp_replicate,
            "dp_shard": plan.dims.dp_shard,
            "cp": plan.dims.cp,
            "tp": plan.dims.tp,
            "replicated_kv": replicates_kv(plan.ranks[0].build.args.n_kv_heads, plan.dims.tp),
            "world_size": plan.dims.world_size,
            "world_source": plan.world_source,
        },
        "fits": plan.fits,
        "length_source": plan.length_source,
        "cp_fit": plan.cp_fit.as_dict() if plan.cp_fit else None,
        "step": plan.step.as_dict(),
        "seconds_per_rank": plan.seconds_per_rank,
        "peak_rss_mib": plan.peak_rss_mib,
        "ranks": [_rank_json(r.build, r.memory) for r in plan.ranks],
    }


def _rank_json(build: RankBuild, memory: MemoryEstimate) -> dict:
    return {
        "rank": build.rank,
        "coordinate": build.coordinate,
        "stages": [
            {
                "stage": s.stage_id,
                "layers": [s.layers.start, s.layers.stop],
                "embedding": s.has_embedding,
                "head": s.has_head,
                "activation_checkpoint": list(s.block_ac),
            }
            for s in build.stages
        ],
        "local_params": build.local_numel,
        "stage_params": build.stage_numel,
        "weights": {
            kind: {
                "global_shape": list(w.global_shape),
                "local_shape": list(w.local_shape),
                "placements": w.placements,
                "dtype": w.dtype,
                "count": w.count,
                "float8": w.float8,
            }
            for kind, w in build.weights.items()
        },
        "memory_bytes": memory.as_dict(),
    }
