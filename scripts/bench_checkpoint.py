"""What a checkpoint costs the training loop: the `bench` flavor's normal step against a step
that also starts a save, with `async_mode = "async"` and with synchronous saves.

    python scripts/bench_checkpoint.py [--steps 12] [--every 3]

Measured side by side in one run, so the ratios hold on a busy machine too.
"""

import argparse
import statistics
import tempfile
import time

from arbor_titan.checkpoint.config import CheckpointConfig
from arbor_titan.checkpoint.manager import CheckpointManager
from arbor_titan.config.cli import load_config
from arbor_titan.metrics import setup_console_logging
from arbor_titan.trainer import Trainer


def step_times(mode: str, dump_folder: str, steps: int, every: int) -> tuple[list, list]:
    """(plain step seconds, seconds of steps that also started a save) for one async mode."""
    cfg = load_config(
        "train_configs/bench.toml",
        [f"--job.dump_folder={dump_folder}", f"--job.name={mode}",
         f"--training.steps={steps}"],
    )  # fmt: skip
    manager = CheckpointManager(CheckpointConfig(async_mode=mode, interval=every))
    trainer = Trainer(cfg, [manager])
    manager.on_train_start(trainer)
    trainer.train_iter = iter(trainer.train_loader)
    plain, saving = [], []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        trainer.state.step += 1
        saves = trainer.state.step % every == 0
        if saves:
            manager.save(trainer)
        elapsed = time.perf_counter() - start
        (saving if saves else plain).append(elapsed)
        print(f"  {mode} step {trainer.state.step}: {elapsed:.2f} s{' + save' if saves else ''}")
    manager.wait()
    return plain[1:], saving  # the first step warms up allocators and kernels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="steps per mode")
    parser.add_argument("--every", type=int, default=3, help="save every this many steps")
    parser.add_argument("--dump-folder", default=None, help="reuse a folder to keep its caches")
    args = parser.parse_args()
    setup_console_logging(0, show=False)
    dump_folder = args.dump_folder or tempfile.mkdtemp(prefix="arbor_ckpt_bench_")
    rows = []
    for mode in ("async", "disabled"):
        plain, saving = step_times(mode, dump_folder, args.steps, args.every)
        rows.append((mode, statistics.median(plain), statistics.median(saving)))
    print("\nbench flavor (16.8M params + AdamW state), seq 512, batch 8")
    print("| saving | normal step | step that starts a save | ratio |")
    print("|---|---|---|---|")
    for mode, plain, saving in rows:
        label = "async" if mode == "async" else "synchronous"
        print(f"| {label} | {plain:.2f} s | {saving:.2f} s | {saving / plain:.2f}x |")


if __name__ == "__main__":
    main()
