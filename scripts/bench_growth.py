"""FLOPs to a target loss: a small model grown mid-run against the large one from scratch.

    python scripts/bench_growth.py [--steps 240] [--grow-at 80] [--val-freq 12] [--quick]

Arm `scratch` trains the `growth_large` flavor (dim 256, 8 layers) from scratch
(train_configs/bench_growth_scratch.toml); arm `grown` trains `debug` (dim 128, 4 layers) and
grows it to that shape by clone_width ×2 then deepen ×2 (bench_growth_grown.toml). Both read
the same tokens in the same order with the same seed, and each decays its learning rate fully
within the same steps: against a mid-run checkpoint of a longer schedule the gains of growth
are inflated ("No Train No Gain", Kaddour et al. 2023).

FLOPs are PaLM's 6·N_non-embedding + attention per token of the model at each step, so the
grown arm counts its small phase and its large phase. The figure of merit is
speedup = FLOPs(scratch to its final val loss) / FLOPs(grown to the same loss), each found by
linear interpolation on a val-loss curve evaluated on the same held-out batches every
`--val-freq` steps. Writes `<dump-folder>/bench_growth.png` (loss vs cumulative FLOPs) and
`bench_growth.json`. The plot needs matplotlib (`pip install matplotlib`).
"""

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from arbor_titan.bench import REPO, RunMetrics, first_reach, launch
from arbor_titan.config.cli import load_config
from arbor_titan.config.job import JobConfig
from arbor_titan.growth import plan_growth
from arbor_titan.metrics import flops_per_token
from arbor_titan.models.arbor import ArborArgs, Transformer, count_params, resolve_args

CONFIGS = {
    "scratch": REPO / "train_configs/bench_growth_scratch.toml",
    "grown": REPO / "train_configs/bench_growth_grown.toml",
}
# --quick: a smoke test of the whole pipeline (the tests' small corpus), not a measurement.
QUICK = [
    "--data.max_files=200",
    "--tokenizer.vocab_size=512",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--validation.steps=1",
    "--metrics.log_freq=1",
]
QUICK_STEPS, QUICK_GROW_AT, QUICK_VAL_FREQ = 4, 1, 2


@dataclass
class Arm:
    """One finished training run, as curves over cumulative training FLOPs."""

    name: str
    cfg: JobConfig
    cum_flops: list[float]  # index = step: FLOPs of steps 1..step
    train: list[tuple[int, float]]  # (step, training loss)
    val: list[tuple[int, float]]  # (step, validation loss)
    events: list[dict]  # growth events of metrics.jsonl

    def val_curve(self) -> list[tuple[float, float]]:
        return [(self.cum_flops[step], loss) for step, loss in self.val]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, help="steps of both arms (default: the configs')")
    parser.add_argument("--grow-at", type=int, help="step of the first growth stage")
    parser.add_argument("--val-freq", type=int, help="evaluate every this many steps")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (~1 minute)")
    parser.add_argument("--dump-folder", default="outputs", help="runs, token cache and results")
    parser.add_argument(
        "--no-train", action="store_true", help="only re-read the runs already in --dump-folder"
    )
    args = parser.parse_args(argv)
    args.dump_folder = str(Path(args.dump_folder).resolve())  # the runs start in the repo root
    if args.quick:
        args.steps = args.steps or QUICK_STEPS
        args.grow_at = args.grow_at or QUICK_GROW_AT
        args.val_freq = args.val_freq or QUICK_VAL_FREQ
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides both arms share, so they differ only in their config's model and growth."""
    overrides = [f"--job.dump_folder={args.dump_folder}"] + (QUICK if args.quick else [])
    if args.steps:
        # 10% warmup, as in the configs; the cosine then ends at min_lr at the last step.
        warmup = max(1, args.steps // 10)
        overrides += [f"--training.steps={args.steps}", f"--lr_scheduler.warmup_steps={warmup}"]
    if args.val_freq:
        overrides.append(f"--validation.freq={args.val_freq}")
    return overrides


def stages_override(config: Path, grow_at: int) -> str:
    """The config's growth stages moved to fire at grow_at, grow_at + 1, ..."""
    stages = load_config(config).growth.stages
    tables = []
    for i, stage in enumerate(stages):
        params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in stage.params.items())
        tables.append(f'{{ at_step = {grow_at + i}, op = "{stage.op}", params = {{ {params} }} }}')
    return f"--growth.stages=[{', '.join(tables)}]"


@functools.cache
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


def cumulative_flops(cfg: JobConfig) -> list[float]:
    """FLOPs of steps 1..s for every s: tokens per step × that step's model FLOPs per token."""
    t = cfg.training
    tokens_per_step = t.local_batch_size * t.seq_len * t.gradient_accumulation_steps
    plan = growth_plan(cfg)
    total, cum = 0.0, [0.0]
    for step in range(1, t.steps + 1):
        args = [args for after, args in plan if after < step][-1]
        total += tokens_per_step * model_flops_per_token(args, t.seq_len)
        cum.append(total)
    return cum


def check_growth_events(cfg: JobConfig, events: list[dict]) -> None:
    """The FLOPs count assumes the planned shapes: the run's growth events must agree."""
    planned = []
    for step, args in growth_plan(cfg)[1:]:
        with torch.device("meta"):
            planned.append((step, count_params(Transformer(args))))
    logged = [(event["step"], event["params_after"]) for event in events]
    if logged != planned:
        raise SystemExit(f"growth events (step, params) {logged} differ from the plan {planned}")


def load_arm(name: str, cfg: JobConfig) -> Arm:
    """Curves of a finished run from its metrics.jsonl."""
    run = RunMetrics.read(Path(cfg.job.dump_folder) / cfg.job.name)
    events = run.events_of("growth")
    if cfg.growth.enable:
        check_growth_events(cfg, events)
    return Arm(name, cfg, cumulative_flops(cfg), run.train, run.val, events)


def summarize(scratch: Arm, grown: Arm) -> dict:
    """The benchmark's numbers: FLOPs to the scratch run's final val loss, and the speedup."""
    target = scratch.val[-1][1]
    scratch_flops = first_reach(scratch.val_curve(), target)
    grown_flops = first_reach(grown.val_curve(), target)
    # The other direction: what the grown run's final loss costs when trained from scratch.
    grown_final = grown.val[-1][1]
    scratch_to_grown_final = first_reach(scratch.val_curve(), grown_final)
    return {
        "steps": scratch.cfg.training.steps,
        "grow_at": [s.at_step for s in grown.cfg.growth.stages],
        "target_val_loss": target,
        "scratch_final_val_loss": target,
        "grown_final_val_loss": grown_final,
        "scratch_total_flops": scratch.cum_flops[-1],
        "grown_total_flops": grown.cum_flops[-1],
        "scratch_flops_to_target": scratch_flops,
        "grown_flops_to_target": grown_flops,
        "speedup": scratch_flops / grown_flops if grown_flops else None,
        "scratch_flops_to_grown_final": scratch_to_grown_final,
    }


def report(summary: dict) -> None:
    def flops(value: float | None) -> str:
        return "not reached" if value is None else f"{value / 1e12:.2f} TFLOP"

    print(f"\ntarget: the scratch run's final val loss {summary['target_val_loss']:.4f}")
    print("| arm | final val loss | total FLOPs | FLOPs to target |")
    print("|---|---|---|---|")
    for arm in ("scratch", "grown"):
        print(
            f"| {arm} | {summary[f'{arm}_final_val_loss']:.4f} | "
            f"{flops(summary[f'{arm}_total_flops'])} | {flops(summary[f'{arm}_flops_to_target'])} |"
        )
    if summary["speedup"] is None:
        print("speedup: not reached (the grown run never got to the target loss)")
    else:
        print(f"speedup: {summary['speedup']:.2f}x fewer FLOPs to the target loss")
    reverse = summary["scratch_flops_to_grown_final"]
    print(
        f"the grown run's final val loss {summary['grown_final_val_loss']:.4f}: "
        + (
            "never reached by the scratch run"
            if reverse is None
            else f"scratch after {flops(reverse)}"
        )
    )


def plot(scratch: Arm, grown: Arm, target: float, path: Path) -> None:
    """Training and validation loss of both arms against cumulative FLOPs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, color in ((scratch, "tab:blue"), (grown, "tab:orange")):
        ax.plot(
            [arm.cum_flops[s] for s, _ in arm.train],
            [loss for _, loss in arm.train],
            color=color,
            alpha=0.3,
            label=f"{arm.name} train",
        )
        flops, losses = zip(*arm.val_curve())
        ax.plot(flops, losses, "o-", color=color, markersize=3, label=f"{arm.name} val")
    for event in grown.events:
        ax.axvline(grown.cum_flops[event["step"]], color="tab:orange", linestyle=":", lw=1)
    ax.axhline(target, color="gray", linestyle="--", lw=1, label="scratch final val loss")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("loss")
    ax.set_title("growth_large from scratch vs debug grown mid-run (dotted: growth)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = common_overrides(args)
    grown_overrides = overrides + (
        [stages_override(CONFIGS["grown"], args.grow_at)] if args.grow_at else []
    )
    arms = {"scratch": overrides, "grown": grown_overrides}
    if not args.no_train:
        for name, arm_overrides in arms.items():
            launch(name, CONFIGS[name], arm_overrides)
    scratch, grown = (load_arm(name, load_config(CONFIGS[name], o)) for name, o in arms.items())

    summary = summarize(scratch, grown)
    report(summary)
    out = Path(args.dump_folder)
    (out / "bench_growth.json").write_text(json.dumps(summary, indent=1))
    plot(scratch, grown, summary["target_val_loss"], out / "bench_growth.png")
    print(f"plot: {out / 'bench_growth.png'}; numbers: {out / 'bench_growth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
