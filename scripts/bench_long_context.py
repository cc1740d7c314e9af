"""Peak memory of a training step against sequence length on the debug model (CPU).

    python scripts/bench_long_context.py [--lengths 1024 2048 4096 8192] [--out DIR] [--quick]

Each (mode, length) point runs in a fresh (forked) process: it builds the debug model (batch 1),
takes one AdamW step so gradients and optimizer state exist, then measures a second step's
peak: the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs just
before the step) minus its resident memory right before it. glibc is told to return every freed
block over 64 KiB to the system (mallopt M_MMAP_THRESHOLD), so resident memory follows the live
tensors. Linux only.

Modes:
- logits: the plain loss on the whole sequence's logits (batch × seq × vocab in fp32, plus
  log-softmax), no activation checkpointing;
- chunked: the chunked loss (`training.loss_chunk_len`, 256 positions a chunk);
- chunked_full_ac: chunked loss and full activation checkpointing (every block recomputed).

Linear growth shows as a constant MiB per 1K tokens down a column. Writes
`<out>/bench_long_context.json` and prints a Markdown table.
"""

import argparse
import ctypes
import json
import multiprocessing
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from arbor_titan.distributed.activation_checkpoint import (
    ActivationCheckpointConfig,
    apply_activation_checkpointing,
)
from arbor_titan.models.arbor import FLAVORS, Transformer
from arbor_titan.models.arbor.loss import ChunkedLoss, cross_entropy_loss

REPO = Path(__file__).resolve().parents[1]
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MODES = ("logits", "chunked", "chunked_full_ac")
LOSS_CHUNK_LEN = 256
QUICK_LENGTHS, QUICK_MODES = (128, 256), ("logits", "chunked")


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def measure_point(mode: str, seq_len: int) -> int:
    """Peak bytes a training step adds at `seq_len` in `mode` (run in its own process)."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = replace(FLAVORS["debug"], max_seq_len=seq_len)
    model = Transformer(args)
    model.init_weights(seed=0)
    if mode != "logits":
        model.chunked_loss = ChunkedLoss(cross_entropy_loss, LOSS_CHUNK_LEN)
    if mode == "chunked_full_ac":
        apply_activation_checkpointing(model.layers, ActivationCheckpointConfig(mode="full"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        if model.chunked_loss is None:
            loss = cross_entropy_loss(model(inputs), labels)
        else:
            loss = model(inputs, labels_bs=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = resident_kib("VmRSS")
    step()
    return (resident_kib("VmHWM") - before) * 1024


def run_point(mode: str, seq_len: int) -> int:
    """`measure_point` in a forked child, so no point inherits another's allocations."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def measure_and_send() -> None:
        try:
            send.send(measure_point(mode, seq_len))
        except Exception as err:  # reported by the parent, with the point named
            send.send(f"{type(err).__name__}: {err}")

    child = context.Process(target=measure_and_send)
    child.start()
    result = receive.recv()
    child.join()
    if isinstance(result, str):
        raise RuntimeError(f"{mode} at {seq_len} tokens: {result}")
    return result


def table(points: dict[str, dict[int, int]], lengths: list[int]) -> str:
    modes = list(points)
    lines = [
        "| tokens | " + " | ".join(f"{m} MiB (MiB/1K tok)" for m in modes) + " |",
        "|---:|" + "---:|" * len(modes),
    ]
    for length in lengths:
        cells = []
        for mode in modes:
            mib = points[mode][length] / 2**20
            cells.append(f"{mib:.1f} ({mib * 1024 / length:.2f})")
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=REPO / "outputs")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 short lengths")
    args = parser.parse_args(argv)
    lengths, modes = (QUICK_LENGTHS, QUICK_MODES) if args.quick else (args.lengths, args.modes)
    points = {mode: {length: run_point(mode, length) for length in lengths} for mode in modes}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": "debug",
        "batch": 1,
        "loss_chunk_len": LOSS_CHUNK_LEN,
        "peak_bytes": {mode: {str(k): v for k, v in p.items()} for mode, p in points.items()},
    }
    (args.out / "bench_long_context.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(points, list(lengths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
