"""Training throughput of the `bench` flavor in eager fp32, eager bf16 and compiled bf16.

    python scripts/bench_train.py [--steps 10] [--warmup 3] [--modes fp32,bf16,compiled_bf16]

Each mode trains the real stack (data, model, AdamW, clipping) on the stdlib corpus; MFU is
taken against matmul peaks measured in this same run, so the ratios hold on a busy machine too.
"""

import argparse
import logging
import tempfile
import time

import torch

from arbor_titan.config.cli import load_config
from arbor_titan.metrics import measure_matmul_peak, setup_console_logging
from arbor_titan.trainer import Trainer

MODES = {
    "fp32": ["--training.mixed_precision_param=float32"],
    "bf16": ["--training.mixed_precision_param=bfloat16"],
    "compiled_bf16": ["--training.mixed_precision_param=bfloat16", "--compile.enable=true"],
}


def time_mode(
    overrides: list[str], dump_folder: str, steps: int, warmup: int
) -> tuple[float, Trainer]:
    """Seconds per optimizer step, median of `steps` after `warmup` (compile happens there)."""
    cfg = load_config(
        "train_configs/bench.toml",
        [
            *overrides,
            f"--job.dump_folder={dump_folder}",
            f"--training.steps={steps + warmup}",
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_iter = iter(trainer.train_loader)
    durations = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        trainer.train_step()
        if i >= warmup:
            durations.append(time.perf_counter() - start)
        print(f"  step {i + 1}/{steps + warmup}: {time.perf_counter() - start:.2f} s", flush=True)
    return sorted(durations)[len(durations) // 2], trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
    )
    parser.add_argument(
        "--dump-folder", default=None, help="reuse a folder to keep its token cache"
    )
    args = parser.parse_args()
    setup_console_logging(0, show=False)
    logging.getLogger("arbor_titan").setLevel(logging.WARNING)
    dump_folder = args.dump_folder or tempfile.mkdtemp(prefix="arbor_bench_")

    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        peaks[dtype] = max(measure_matmul_peak(dtype) for _ in range(3))
        print(f"matmul peak {dtype}: {peaks[dtype] / 1e9:.0f} GFLOP/s", flush=True)

    rows = []
    for mode in args.modes.split(","):
        print(f"{mode}:", flush=True)
        seconds, trainer = time_mode(MODES[mode], dump_folder, args.steps, args.warmup)
        tokens = trainer.cfg.training.local_batch_size * trainer.cfg.training.seq_len
        tokens_per_second = tokens / seconds
        peak = peaks[torch.float32 if mode == "fp32" else torch.bfloat16]
        rows.append((mode, tokens_per_second, tokens_per_second * trainer.flops_per_token / peak))
        del trainer

    print(f"\nbench flavor (16.8M params, seq 512, batch 8), {torch.get_num_threads()} threads")
    print("| mode | tokens/s | MFU vs this run's matmul peak |")
    print("|---|---|---|")
    for mode, tps, mfu in rows:
        print(f"| {mode} | {tps:,.0f} | {100 * mfu:.1f}% |")


if __name__ == "__main__":
    main()
