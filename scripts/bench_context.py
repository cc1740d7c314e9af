"""Sequence-length warmup against a constant length: FLOPs and time to the same validation loss.

    python scripts/bench_context.py [--steps 120] [--warmup-steps 48] [--start-seq-len 64] [--quick]

Arm `constant` trains the `bench` flavor at sequence length 512 throughout
(train_configs/bench_context.toml); arm `warmup` starts at `--start-seq-len` and reaches 512
after `--warmup-steps`, doubling at equal intervals (64, 128, 256, 512 by default, as a `stages`
context schedule: the lengths must divide a step's tokens, which a linear ramp's don't), with
`keep_tokens_per_step` so every step of both arms trains on the same 4,096 tokens: the same
tokens in the same order (the loader cuts one stream at a cursor), the same seed and learning
rate schedule. Validation runs at the full length in both arms, on the same held-out batches.

FLOPs are PaLM's 6·N_non-embedding + 12·L·H·Q·T per token, with T the length each step trained
at (so a short step costs less attention). Time is the sum of the training steps' own seconds
(validation excluded). The figures of merit: FLOPs and seconds for the warmup arm to reach the
constant arm's final validation loss, each by linear interpolation between evaluations.
Writes `<dump-folder>/bench_context.json` and `bench_context.png`.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from arbor_titan.bench import REPO, RunMetrics, first_reach, launch
from arbor_titan.config.cli import load_config
from arbor_titan.config.job import JobConfig
from arbor_titan.metrics import flops_per_token
from arbor_titan.models.arbor import Transformer, count_params, resolve_args

CONFIG = REPO / "train_configs/bench_context.toml"
# --quick: a smoke test of the whole pipeline (the tests' small corpus), not a measurement.
QUICK = [
    "--model.flavor=debug",
    "--data.max_files=200",
    "--tokenizer.vocab_size=512",
    "--training.seq_len=128",
    "--training.local_batch_size=2",
    "--validation.seq_len=128",
    "--validation.steps=1",
]
QUICK_STEPS, QUICK_WARMUP_STEPS, QUICK_START, QUICK_VAL_FREQ = 6, 3, 64, 2


@dataclass
class Arm:
    """One finished run as per-step curves: index = step, entry 0 = before the first step."""

    name: str
    cum_flops: list[float]
    cum_seconds: list[float]
    seq_lens: list[int]  # the length step s trained at, at index s
    val: list[tuple[int, float]]
    train: list[tuple[int, float]]

    def val_curve(self, axis: list[float]) -> list[tuple[float, float]]:
        return [(axis[step], loss) for step, loss in self.val]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, help="steps of both arms (default: the config's)")
    parser.add_argument("--warmup-steps", type=int, default=48, help="steps of the length warmup")
    parser.add_argument("--start-seq-len", type=int, default=64, help="the warmup's first length")
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
        args.warmup_steps, args.start_seq_len = QUICK_WARMUP_STEPS, QUICK_START
        args.val_freq = args.val_freq or QUICK_VAL_FREQ
    return args


def arm_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each arm's command-line overrides: shared ones, plus the warmup schedule for `warmup`."""
    common = [f"--job.dump_folder={args.dump_folder}"] + (QUICK if args.quick else [])
    if args.steps:
        warmup = max(1, args.steps // 10)  # as in the config: 10% lr warmup, cosine to the end
        common += [f"--training.steps={args.steps}", f"--lr_scheduler.warmup_steps={warmup}"]
    if args.val_freq:
        common.append(f"--validation.freq={args.val_freq}")
    full = load_config(CONFIG, common).training.seq_len
    stages = doubling_stages(args.start_seq_len, args.warmup_steps, full)
    schedule = f"{{ stages = [{', '.join(stages)}] }}"
    return {
        "constant": common,
        "warmup": common
        + [
            "--job.name=bench_context_warmup",
            "--context.schedule=stages",
            f"--context.schedule_params={schedule}",
            "--context.keep_tokens_per_step=true",
        ],
    }


def doubling_stages(start: int, warmup_steps: int, full: int) -> list[str]:
    """The warmup as `stages` tables: start, 2·start, 4·start, ... each for an equal share of
    the warmup steps, then the full length. Doubling, because with keep_tokens_per_step every
    length must divide a step's tokens (a power of two here), which a linear ramp's 192 doesn't."""
    lengths, length = [], start
    while length < full:
        lengths, length = [*lengths, length], 2 * length
    steps = [round(k * warmup_steps / len(lengths)) for k in range(len(lengths))]
    tables = [f"{{ step = {step}, seq_len = {n} }}" for step, n in zip(steps, lengths)]
    return [*tables, f"{{ step = {warmup_steps}, seq_len = {full} }}"]


def flops_per_token_at(cfg: JobConfig, seq_len: int) -> int:
    """Training FLOPs per token of the config's model when it trains at `seq_len`."""
    args = resolve_args(cfg.model, cfg.tokenizer.vocab_size, cfg.training.seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    embedding = model.tok_embeddings.weight.numel()
    return flops_per_token(
        count_params(model), embedding, args.n_layers, args.n_heads, args.head_dim, seq_len
    )


def shapes_by_step(cfg: JobConfig, events: list[dict]) -> list[tuple[int, int]]:
    """(seq_len, local batch) of every step 1..steps, from the run's context events (an event at
    step s sets the shape of the steps after s; one at step 0 the starting shape)."""
    shape = (cfg.training.seq_len, cfg.training.local_batch_size)
    changes = {event["step"]: (event["seq_len"], event["local_batch_size"]) for event in events}
    shapes = []
    for step in range(cfg.training.steps):
        shape = changes.get(step, shape)
        shapes.append(shape)
    return shapes


def load_arm(name: str, cfg: JobConfig) -> Arm:
    """Curves of a finished run: cumulative FLOPs and training seconds at every step."""
    run = RunMetrics.read(Path(cfg.job.dump_folder) / cfg.job.name)
    shapes = shapes_by_step(cfg, run.events_of("context"))
    records = {record["step"]: record for record in run.steps}
    if sorted(records) != list(range(1, cfg.training.steps + 1)):
        raise SystemExit(f"[{name}] metrics.jsonl lacks a record per step (metrics.log_freq=1)")
    cum_flops, cum_seconds = [0.0], [0.0]
    for step, (seq_len, batch) in enumerate(shapes, start=1):
        tokens = seq_len * batch * cfg.training.gradient_accumulation_steps
        cum_flops.append(cum_flops[-1] + tokens * flops_per_token_at(cfg, seq_len))
        cum_seconds.append(cum_seconds[-1] + tokens / records[step]["tokens_per_second"])
    seq_lens = [0] + [seq_len for seq_len, _ in shapes]
    return Arm(name, cum_flops, cum_seconds, seq_lens, run.val, run.train)


def summarize(constant: Arm, warmup: Arm) -> dict:
    """FLOPs and seconds for each arm to reach the constant arm's final validation loss."""
    target = constant.val[-1][1]
    summary = {"target_val_loss": target}
    for arm in (constant, warmup):
        summary[arm.name] = {
            "final_val_loss": arm.val[-1][1],
            "total_flops": arm.cum_flops[-1],
            "total_seconds": arm.cum_seconds[-1],
            "flops_to_target": first_reach(arm.val_curve(arm.cum_flops), target),
            "seconds_to_target": first_reach(arm.val_curve(arm.cum_seconds), target),
            "seq_lens": sorted(set(arm.seq_lens[1:])),
        }
    for measure in ("flops", "seconds"):
        reached = summary["warmup"][f"{measure}_to_target"]
        summary[f"{measure}_ratio"] = (
            summary["constant"][f"{measure}_to_target"] / reached if reached else None
        )
    return summary


def report(summary: dict) -> None:
    def value(x: float | None, unit: str, scale: float) -> str:
        return "not reached" if x is None else f"{x / scale:.2f} {unit}"

    print(f"\ntarget: the constant arm's final val loss {summary['target_val_loss']:.4f}")
    print("| arm | lengths | final val loss | total FLOPs | FLOPs to target | seconds to target |")
    print("|---|---|---|---|---|---|")
    for name in ("constant", "warmup"):
        arm = summary[name]
        lengths = f"{arm['seq_lens'][0]}–{arm['seq_lens'][-1]}"
        print(
            f"| {name} | {lengths} | {arm['final_val_loss']:.4f} | "
            f"{value(arm['total_flops'], 'TFLOP', 1e12)} | "
            f"{value(arm['flops_to_target'], 'TFLOP', 1e12)} | "
            f"{value(arm['seconds_to_target'], 's', 1)} |"
        )
    for measure in ("flops", "seconds"):
        ratio = summary[f"{measure}_ratio"]
        print(
            f"{measure}: "
            + ("the warmup arm never reached the target" if ratio is None else f"{ratio:.2f}x")
            + " (constant / warmup, to the target loss)"
        )


def plot(constant: Arm, warmup: Arm, target: float, path: Path) -> None:
    """Validation loss of both arms against FLOPs and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis_name, label in (
        (axes[0], "cum_flops", "cumulative training FLOPs"),
        (axes[1], "cum_seconds", "cumulative training seconds"),
    ):
        for arm, color in ((constant, "tab:blue"), (warmup, "tab:orange")):
            xs, losses = zip(*arm.val_curve(getattr(arm, axis_name)))
            ax.plot(xs, losses, "o-", color=color, markersize=3, label=f"{arm.name} val")
        ax.axhline(target, color="gray", linestyle="--", lw=1, label="constant final val loss")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (full length)")
        ax.legend()
    fig.suptitle("sequence-length warmup vs constant length, same tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = arm_overrides(args)
    if not args.no_train:
        for name, arm_args in overrides.items():
            launch(name, CONFIG, arm_args)
    constant, warmup = (load_arm(name, load_config(CONFIG, o)) for name, o in overrides.items())
    summary = summarize(constant, warmup)
    report(summary)
    out = Path(args.dump_folder)
    (out / "bench_context.json").write_text(json.dumps(summary, indent=1))
    plot(constant, warmup, summary["target_val_loss"], out / "bench_context.png")
    print(f"plot: {out / 'bench_context.png'}; numbers: {out / 'bench_context.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
