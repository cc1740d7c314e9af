"""The growth benchmark: does growing a small model pay, against tuned, fully decayed baselines?

    python scripts/bench_growth.py [--steps 160] [--lrs 5e-4 1e-3 2e-3 4e-3] [--seeds 1 2 3]
        [--grow-at 0.33 0.15 0.5] [--arms ...] [--jobs 1] [--quick] [--no-train] [--reuse]

Arms (train_configs/bench_growth_<config>.toml), all ending in the `growth_large` shape except
`small`, all on the same data order per seed, each with warmup + cosine fully decayed within
its own run ("No Train No Gain", Kaddour et al. 2023: a mid-run checkpoint of a longer schedule
inflates the gains of growth):

- `scratch`: growth_large (dim 256, 8 layers) from the start.
- `exact`: debug (dim 128, 4 layers) grown by clone_width ×2, then deepen ×2: function-preserving.
- `stack`: the same, with G_stack (the whole stack repeated) as the depth step.
- `random`: the shapes and steps of `exact`, every new entry freshly initialised
  (growth.init = "random"): the control that tells function preservation from progressive size.
- `small`: debug alone.
- `rewarm`: `exact` with an 8-step lr re-warmup after each growth stage, at exact's rate.
- `matched`: scratch with as many steps as the grown arms' FLOPs buy, fully decayed: the
  equal-compute baseline a grown arm's final loss is compared with.

Protocol: (1) every arm at every `--lrs` rate with `--tune-seed`; each arm's rate is the one with
the lowest final loss on the held-out split (`matched` uses scratch's, `rewarm` exact's); (2)
every arm at its rate with each of `--seeds` (fresh seeds: the selection runs are not
reported); (3) `exact` and `stack` grown at the other `--grow-at` fractions of the run, first
seed. `--reuse` skips runs an interrupted protocol finished. FLOPs are PaLM's
6·N_non-embedding + attention per token of the model at each step, summed over both phases of a
grown run, so they do not depend on the machine's load. The figures of merit, paired by seed:
speedup = FLOPs(scratch to its final val loss) / FLOPs(arm to that loss), linearly interpolated
between evaluations; and the arm's final val loss minus `matched`'s. Writes
`<dump-folder>/bench_growth.{json,png}` and prints the tables.
"""

import argparse
import json
import math
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from arbor_titan.bench import REPO, RunMetrics, first_reach, launch
from arbor_titan.config.cli import load_config
from arbor_titan.config.job import JobConfig
from arbor_titan.growth import plan_growth
from arbor_titan.metrics import flops_per_token
from arbor_titan.models.arbor import ArborArgs, Transformer, count_params, resolve_args

ARM_CONFIGS = {
    "scratch": "scratch",
    "exact": "grown",
    "stack": "stack",
    "random": "random",
    "small": "small",
    "rewarm": "rewarm",
    "matched": "scratch",
}
CONFIGS = {
    arm: REPO / f"train_configs/bench_growth_{name}.toml" for arm, name in ARM_CONFIGS.items()
}
TUNED = ("scratch", "exact", "stack", "random", "small")
# Arms that take another arm's tuned rate: the re-warmup measured both ways at exact's rate,
# and the equal-FLOPs baseline at scratch's.
BORROWED = {"rewarm": "exact", "matched": "scratch"}
GROWN = ("exact", "stack", "random", "rewarm")
TIMED = ("exact", "stack")
# --quick: a smoke test of the whole pipeline (the tests' small corpus), not a measurement.
QUICK = [
    "--data.max_files=200",
    "--tokenizer.vocab_size=512",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--validation.steps=1",
    "--metrics.log_freq=1",
]
QUICK_ARGS = {
    "steps": 4,
    "val_freq": 2,
    "lrs": [3e-3],
    "seeds": [0],
    "grow_at": [0.34],
    "arms": ["scratch", "exact"],
}
# Two-sided 95% Student t quantiles by degrees of freedom, for the seeds' confidence intervals.
# Beyond these, the normal's 1.96 (a slightly narrow interval).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Run:
    """One training run of the protocol; runs with equal fields are the same run."""

    arm: str
    lr: float
    seed: int
    steps: int
    grow_at: int = 0  # step of the first growth stage; 0 for arms that do not grow

    @property
    def job(self) -> str:
        grow = f"_at{self.grow_at}" if self.grow_at else ""
        return f"bench_growth_{self.arm}_lr{self.lr:g}_seed{self.seed}_steps{self.steps}{grow}"


@dataclass
class Result:
    """A finished run as curves over cumulative training FLOPs."""

    run: Run
    cum_flops: list[float]  # index = step: FLOPs of steps 1..step
    val: list[tuple[int, float]]  # (step, validation loss)
    jumps: list[float]  # held-out loss after minus before each growth stage
    wall_s: float | None

    @property
    def final(self) -> float:
        return self.val[-1][1]

    def val_curve(self) -> list[tuple[float, float]]:
        return [(self.cum_flops[step], loss) for step, loss in self.val]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, help="steps of every arm (default: the configs')")
    parser.add_argument("--val-freq", type=int, help="evaluate every this many steps")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3], help="peak lr grid"
    )
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the lr-grid runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="reported seeds")
    parser.add_argument(
        "--grow-at",
        type=float,
        nargs="+",
        default=[0.33, 0.15, 0.5],
        help="fractions of the run at which to grow; the first is the main protocol's",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[*TUNED, "rewarm"],
        default=[*TUNED, "rewarm"],
        help="arms to run besides `matched`; scratch and exact are always needed",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of every arm")
    parser.add_argument("--dump-folder", default="outputs", help="runs, token cache and results")
    parser.add_argument(
        "--no-train", action="store_true", help="only re-read the runs already in --dump-folder"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="train only the runs not yet finished in --dump-folder (an interrupted protocol)",
    )
    args = parser.parse_args(argv)
    args.dump_folder = str(Path(args.dump_folder).resolve())  # the runs start in the repo root
    if args.quick:
        for key, value in QUICK_ARGS.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.steps = args.steps or load_config(CONFIGS["scratch"]).training.steps
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if not {"scratch", "exact"} <= set(args.arms):
        parser.error("--arms must include scratch and exact (the target and the FLOPs budget)")
    for fraction in args.grow_at:
        # Both stages (at g and g + 1) must fire before the last step.
        if not 0 < fraction < 1 or grow_step(fraction, args.steps) + 1 >= args.steps:
            parser.error(f"--grow-at {fraction}: must fall inside the run of {args.steps} steps")
    return args


def grow_step(fraction: float, steps: int) -> int:
    return max(1, round(fraction * steps))


def run_overrides(run: Run, args: argparse.Namespace) -> list[str]:
    """Everything a run sets on the command line; the rest comes from its arm's config."""
    overrides = [
        f"--job.dump_folder={args.dump_folder}",
        f"--job.name={run.job}",
        *(QUICK if args.quick else []),
        f"--training.steps={run.steps}",
        # 10% warmup, as in the configs; the cosine then ends at min_lr at the last step.
        f"--lr_scheduler.warmup_steps={max(1, run.steps // 10)}",
        f"--optimizer.lr={run.lr}",
        f"--training.seed={run.seed}",
    ]
    if args.val_freq:
        overrides.append(f"--validation.freq={args.val_freq}")
    if run.grow_at:
        overrides += [f"--growth.seed={run.seed}", stages_override(run.arm, run.grow_at)]
    return overrides


def stages_override(arm: str, grow_at: int) -> str:
    """The arm's growth stages moved to fire at grow_at, grow_at + 1, ..."""
    stages = load_config(CONFIGS[arm]).growth.stages
    tables = []
    for i, stage in enumerate(stages):
        params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in stage.params.items())
        tables.append(f'{{ at_step = {grow_at + i}, op = "{stage.op}", params = {{ {params} }} }}')
    return f"--growth.stages=[{', '.join(tables)}]"


def config_of(run: Run, args: argparse.Namespace) -> JobConfig:
    return load_config(CONFIGS[run.arm], run_overrides(run, args))


def model_flops_per_token(args: ArborArgs, seq_len: int) -> int:
    """Training FLOPs per token of a model shape, counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
    embedding = model.tok_embeddings.weight.numel()
    return flops_per_token(
        count_params(model), embedding, args.n_layers, args.n_heads, args.head_dim, seq_len
    )


def growth_plan(cfg: JobConfig) -> list[tuple[int, ArborArgs]]:
    """(step, shape): the first shape trains from step 1; each later one after its step."""
    args = resolve_args(cfg.model, cfg.tokenizer.vocab_size, cfg.training.seq_len)
    plan = [(0, args)]
    if cfg.growth.enable:
        for stage, growth in zip(cfg.growth.stages, plan_growth(cfg.growth, args)):
            plan.append((stage.at_step, growth.new_args))
    return plan


def tokens_per_step(cfg: JobConfig) -> int:
    t = cfg.training
    return t.local_batch_size * t.seq_len * t.gradient_accumulation_steps


def cumulative_flops(cfg: JobConfig) -> list[float]:
    """FLOPs of steps 1..s for every s: tokens per step × that step's model FLOPs per token."""
    seq_len = cfg.training.seq_len
    plan = [(after, model_flops_per_token(shape, seq_len)) for after, shape in growth_plan(cfg)]
    total, cum = 0.0, [0.0]
    for step in range(1, cfg.training.steps + 1):
        total += tokens_per_step(cfg) * [flops for after, flops in plan if after < step][-1]
        cum.append(total)
    return cum


def matched_steps(args: argparse.Namespace, lr: float, seed: int) -> int:
    """Steps of the large shape that cost what a grown arm costs at the main growth point."""
    grown = Run("exact", lr, seed, args.steps, grow_step(args.grow_at[0], args.steps))
    scratch = Run("scratch", lr, seed, args.steps)
    grown_flops = cumulative_flops(config_of(grown, args))[-1]
    return round(grown_flops / cumulative_flops(config_of(scratch, args))[1])


def check_growth_events(cfg: JobConfig, events: list[dict]) -> None:
    """The FLOPs count assumes the planned shapes: the run's growth events must agree."""
    planned = []
    for step, args in growth_plan(cfg)[1:]:
        with torch.device("meta"):
            planned.append((step, count_params(Transformer(args))))
    logged = [(event["step"], event["params_after"]) for event in events]
    if logged != planned:
        raise SystemExit(f"growth events (step, params) {logged} differ from the plan {planned}")


class Protocol:
    """Trains the runs not yet trained (by this invocation, or with --reuse by any) and reads
    them back, with each run's wall time."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.walls_path = Path(args.dump_folder) / "bench_growth_walls.json"
        self.walls = json.loads(self.walls_path.read_text()) if self.walls_path.exists() else {}
        # Jobs finished by this invocation, or with --reuse by any (the walls file lists them).
        self.trained: set[str] = set(self.walls) if args.reuse else set()
        self.lock = threading.Lock()

    def results(self, runs: list[Run]) -> dict[Run, Result]:
        unique = list(dict.fromkeys(runs))
        if not self.args.no_train:
            todo = [run for run in unique if run.job not in self.trained]
            with ThreadPoolExecutor(self.args.jobs) as pool:
                futures = [pool.submit(self.train, run) for run in todo]
                try:
                    for future in futures:
                        future.result()
                except BaseException:  # a failed run (SystemExit) or ^C: start no more runs
                    pool.shutdown(cancel_futures=True)
                    raise
        return {run: self.load(run) for run in unique}

    def train(self, run: Run) -> None:
        start = time.monotonic()
        launch(run.job, CONFIGS[run.arm], run_overrides(run, self.args))
        with self.lock:  # runs finish on --jobs threads
            self.walls[run.job] = time.monotonic() - start
            self.trained.add(run.job)
            self.walls_path.write_text(json.dumps(self.walls, indent=1))
        run_dir = Path(self.args.dump_folder) / run.job
        for folder in ("checkpoints", "growth"):  # only metrics.jsonl is read back
            shutil.rmtree(run_dir / folder, ignore_errors=True)

    def load(self, run: Run) -> Result:
        cfg = config_of(run, self.args)
        run_dir = Path(cfg.job.dump_folder) / cfg.job.name
        metrics = RunMetrics.read(run_dir) if (run_dir / "metrics.jsonl").is_file() else None
        if metrics is None or not metrics.val or metrics.val[-1][0] != run.steps:
            # Validation always runs at the last step: without it the run did not finish.
            raise SystemExit(f"{run_dir}: no finished run to read; train it (without --no-train)")
        events = metrics.events_of("growth")
        if cfg.growth.enable:
            check_growth_events(cfg, events)
        jumps = [event["loss_after"] - event["loss_before"] for event in events]
        return Result(run, cumulative_flops(cfg), metrics.val, jumps, self.walls.get(run.job))


def spread(values: list[float]) -> dict:
    """Mean, standard deviation, range and 95% t-interval of the mean over seeds."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan
    return {
        "mean": mean,
        "sd": sd,
        "min": min(values),
        "max": max(values),
        "ci95": [mean - half, mean + half],
        "n": n,
    }


def best_lrs(grid: dict[Run, Result]) -> dict[str, float]:
    """Each tuned arm's lr with the lowest final held-out loss; BORROWED arms take theirs."""
    best = {}
    for run, result in grid.items():
        if run.arm not in best or result.final < grid[best[run.arm]].final:
            best[run.arm] = run
    best = {arm: run.lr for arm, run in best.items()}
    return best | {arm: best[source] for arm, source in BORROWED.items()}


def paired(scratch: Result, arm: Result) -> dict:
    """The arm against the scratch run of the same seed: FLOPs to scratch's final loss."""
    target = scratch.final
    scratch_flops = first_reach(scratch.val_curve(), target)
    arm_flops = first_reach(arm.val_curve(), target)
    return {
        "target": target,
        "flops_to_target": arm_flops,
        "speedup": scratch_flops / arm_flops if arm_flops else None,
    }


def arm_summary(arm: str, results: list[Result], scratch: list[Result], matched: list[Result]):
    """One arm over its seeds (each list in seed order)."""
    pairs = [paired(s, r) for s, r in zip(scratch, results)]
    speedups = [p["speedup"] for p in pairs if p["speedup"] is not None]
    summary = {
        "lr": results[0].run.lr,
        "seeds": [r.run.seed for r in results],
        "steps": results[0].run.steps,
        "grow_at": results[0].run.grow_at,
        "total_flops": results[0].cum_flops[-1],
        "final_val_loss": spread([r.final for r in results]),
        "per_seed_final": [r.final for r in results],
        "flops_to_target": [p["flops_to_target"] for p in pairs],
        "reached": len(speedups),
        "speedup": spread(speedups) if speedups else None,
        "growth_jumps": spread([sum(r.jumps) for r in results]) if results[0].jumps else None,
        "wall_s": spread([r.wall_s for r in results]) if all(r.wall_s for r in results) else None,
    }
    if arm in GROWN:
        summary["minus_matched"] = spread([r.final - m.final for r, m in zip(results, matched)])
    return summary


def timing_summary(sweep: dict[Run, Result], scratch: Result) -> list[dict]:
    rows = []
    for run, result in sorted(sweep.items(), key=lambda item: (item[0].arm, item[0].grow_at)):
        rows.append(
            {
                "arm": run.arm,
                "seed": run.seed,
                "grow_at": run.grow_at,
                "final_val_loss": result.final,
                "total_flops": result.cum_flops[-1],
                **paired(scratch, result),
            }
        )
    return rows


def fmt_spread(s: dict | None, digits: int = 3) -> str:
    return "—" if s is None else f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def report(summary: dict) -> None:
    arms, grid = summary["arms"], summary["lr_grid"]
    print(f"\nlr grid (seed {summary['tune_seed']}, final val loss; * = chosen):")
    lrs = sorted({float(lr) for row in grid.values() for lr in row})
    print("| arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---" * (len(lrs) + 1) + "|")
    for arm, row in grid.items():
        cells = [f"{row[str(lr)]:.4f}{'*' if lr == arms[arm]['lr'] else ''}" for lr in lrs]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    if summary["lr_at_grid_edge"]:
        print(f"the best rate of {summary['lr_at_grid_edge']} is at the grid's edge: widen --lrs")
    n = len(summary["seeds"])
    print(f"\nseeds {summary['seeds']} at each arm's rate (mean ± sd; speedup [min, max]):")
    print(
        "| arm | lr | steps | total TFLOP | final val loss | FLOPs to scratch's final | speedup | "
        "final − matched | loss jump at growth | wall s |"
    )
    print("|---" * 10 + "|")
    for arm, s in arms.items():
        reached = [f for f in s["flops_to_target"] if f is not None]
        to_target = (
            f"{statistics.fmean(reached) / 1e12:.2f} TFLOP ({s['reached']}/{n})"
            if reached
            else f"not reached (0/{n})"
        )
        speed = s["speedup"]
        speed_text = (
            f"{speed['mean']:.2f}× [{speed['min']:.2f}, {speed['max']:.2f}]" if speed else "—"
        )
        print(
            f"| {arm} | {s['lr']:g} | {s['steps']} | {s['total_flops'] / 1e12:.2f} | "
            f"{fmt_spread(s['final_val_loss'])} | {to_target} | {speed_text} | "
            f"{fmt_spread(s.get('minus_matched'))} | {fmt_spread(s['growth_jumps'])} | "
            f"{fmt_spread(s['wall_s'], 0)} |"
        )
    for arm in (arm for arm in GROWN if arm in arms):
        speed = arms[arm]["speedup"]
        if speed and speed["n"] > 1:
            low, high = speed["ci95"]
            print(f"{arm}: speedup 95% t-interval over seeds [{low:.2f}, {high:.2f}]")
    if summary["timing"]:
        print(f"\ngrowth timing (seed {summary['timing'][0]['seed']}):")
        print("| arm | grow at step | final val loss | FLOPs to scratch's final | speedup |")
        print("|---|---|---|---|---|")
        for row in summary["timing"]:
            flops = row["flops_to_target"]
            print(
                f"| {row['arm']} | {row['grow_at']} | {row['final_val_loss']:.4f} | "
                + (f"{flops / 1e12:.2f} TFLOP | {row['speedup']:.2f}× |" if flops else "— | — |")
            )


def plot(curves: dict[str, list[Result]], summary: dict, path: Path) -> None:
    """Left: every arm's validation loss against FLOPs, mean over seeds with the range shaded.
    Right: the lr grid's final losses."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(2, 1))
    for arm, results in curves.items():
        steps = [step for step, _ in results[0].val]
        flops = [results[0].cum_flops[step] for step in steps]
        per_step = list(zip(*[[loss for _, loss in r.val] for r in results]))
        mean = [statistics.fmean(losses) for losses in per_step]
        (line,) = left.plot(flops, mean, "-", lw=1.5, label=f"{arm} (lr {results[0].run.lr:g})")
        left.fill_between(
            flops,
            [min(v) for v in per_step],
            [max(v) for v in per_step],
            alpha=0.2,
            color=line.get_color(),
        )
    left.axhline(
        summary["arms"]["scratch"]["final_val_loss"]["mean"],
        color="gray",
        ls="--",
        lw=1,
        label="scratch final (mean)",
    )
    exact = curves["exact"][0]
    left.axvline(exact.cum_flops[exact.run.grow_at], color="gray", ls=":", lw=1, label="growth")
    left.set_xlabel("cumulative training FLOPs")
    left.set_ylabel("validation loss")
    left.set_title(f"seeds {summary['seeds']}: mean, range shaded")
    left.legend()
    for arm, row in summary["lr_grid"].items():
        lrs = sorted(row, key=float)
        right.plot([float(lr) for lr in lrs], [row[lr] for lr in lrs], "o-", label=arm)
    right.set_xscale("log")
    right.set_xlabel("peak learning rate")
    right.set_ylabel("final validation loss")
    right.set_title(f"lr grid, seed {summary['tune_seed']}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    protocol = Protocol(args)
    main_at = grow_step(args.grow_at[0], args.steps)

    def run(arm: str, lr: float, seed: int, grow_at: int = main_at, steps: int = args.steps):
        return Run(arm, lr, seed, steps, grow_at if arm in GROWN else 0)

    tuned = [arm for arm in args.arms if arm in TUNED]
    grid = protocol.results([run(a, lr, args.tune_seed) for a in tuned for lr in args.lrs])
    lr = best_lrs(grid)
    steps = matched_steps(args, lr["exact"], args.seeds[0])
    by_arm = {arm: [run(arm, lr[arm], seed) for seed in args.seeds] for arm in args.arms}
    by_arm["matched"] = [run("matched", lr["matched"], seed, steps=steps) for seed in args.seeds]
    sweep_runs = [
        run(arm, lr[arm], args.seeds[0], grow_step(fraction, args.steps))
        for arm in TIMED
        if arm in args.arms
        for fraction in args.grow_at[1:]
    ]
    done = protocol.results([r for runs in by_arm.values() for r in runs] + sweep_runs)
    curves = {arm: [done[r] for r in runs] for arm, runs in by_arm.items()}

    summary = {
        "steps": args.steps,
        "tokens_per_step": tokens_per_step(config_of(by_arm["scratch"][0], args)),
        "tune_seed": args.tune_seed,
        "seeds": args.seeds,
        "lr_grid": {
            arm: {str(r.lr): res.final for r, res in grid.items() if r.arm == arm} for arm in tuned
        },
        "lr_at_grid_edge": [
            arm for arm in tuned if len(args.lrs) > 1 and lr[arm] in (min(args.lrs), max(args.lrs))
        ],
        "arms": {
            arm: arm_summary(arm, results, curves["scratch"], curves["matched"])
            for arm, results in curves.items()
        },
        "timing": timing_summary(
            {
                r: done[r]
                for r in [*sweep_runs, *(by_arm[arm][0] for arm in TIMED if arm in by_arm)]
            },
            curves["scratch"][0],
        ),
    }
    report(summary)
    out = Path(args.dump_folder)
    (out / "bench_growth.json").write_text(json.dumps(summary, indent=1))
    plot(curves, summary, out / "bench_growth.png")
    print(f"plot: {out / 'bench_growth.png'}; numbers: {out / 'bench_growth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
