"""Memory of a training step against sequence length on the debug model (CPU), on one rank and on
two context-parallel ranks, beside the planner's estimate of the same config.

    python scripts/bench_long_context.py [--lengths 1024 2048 4096 8192] [--cp 1 2] [--out DIR]
                                         [--quick]

Each (mode, cp, length) point runs in fresh (forked) processes, one per cp rank (a gloo process
group, as `torchrun` would give them). Each builds the debug model (batch 1, fp32) from a config
through `build_model`, the code path the planner simulates, takes one AdamW step so gradients and
optimizer state have existed, then measures, from its resident memory:

- peak: the highest resident memory over a forward and backward (VmHWM, reset through
  /proc/self/clear_refs just before) minus the resident memory before it;
- held: what autograd keeps for backward at the end of a forward: the resident memory with the
  loss alive minus that once the loss (and the graph it holds) is dropped.

glibc is told to return every freed block over 64 KiB to the system (mallopt M_MMAP_THRESHOLD),
so resident memory follows the live tensors. Linux only. A point's figure is its largest rank's.

The planner (`python -m arbor_titan.estimate`, device cpu) plans the same config: its
`activations` term is what autograd keeps (compared with held) and the step's peak above the
resident parameters and optimizer state is activations + backward working memory + gradients +
FSDP's gathered weights and gradient buffers (compared with peak).

Modes (the chunked loss scores `LOSS_CHUNK_LEN` positions at a time):
- logits: the plain loss on the whole sequence's logits (seq × vocab in fp32, plus
  log-softmax), no activation checkpointing;
- chunked: the chunked loss (`training.loss_chunk_len`);
- chunked_op_ac: chunked loss and selective activation checkpointing of every op but the
  matmuls and attention;
- chunked_full_ac: chunked loss and full activation checkpointing (every block recomputed).

Linear growth shows as a constant MiB per 1K tokens down a column. Writes
`<out>/bench_long_context.json` and prints a Markdown table; progress goes to stderr.
"""

import argparse
import ctypes
import json
import multiprocessing
import re
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from arbor_titan.config.cli import load_config
from arbor_titan.config.job import JobConfig
from arbor_titan.distributed.build import build_model
from arbor_titan.distributed.context_parallel import ContextParallel
from arbor_titan.distributed.parallel_dims import ParallelDims
from arbor_titan.estimate import EstimateOptions, MemoryEstimate, MemoryOptions, plan
from arbor_titan.models.arbor import FLAVORS, resolve_args
from arbor_titan.models.arbor.loss import cross_entropy_loss
from arbor_titan.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
FLAVOR = "debug"
VOCAB = FLAVORS[FLAVOR].vocab_size
LOSS_CHUNK_LEN = 256
BASE = [
    f"--model.flavor={FLAVOR}",
    "--training.local_batch_size=1",
    "--training.mixed_precision_param=float32",
]
CHUNKED = f"--training.loss_chunk_len={LOSS_CHUNK_LEN}"
MODES = {
    "logits": [],
    "chunked": [CHUNKED],
    "chunked_op_ac": [
        CHUNKED,
        "--activation_checkpoint.mode=selective",
        "--activation_checkpoint.selective_ac_option=op",
    ],
    "chunked_full_ac": [CHUNKED, "--activation_checkpoint.mode=full"],
}
QUICK_LENGTHS, QUICK_MODES, QUICK_CP = (512, 1024), ("logits", "chunked"), (1, 2)
RANK_TIMEOUT_S = 600


def job_config(mode: str, seq_len: int, cp: int) -> JobConfig:
    """The config both the measurement and the planner see."""
    return load_config(
        None,
        [
            *BASE,
            f"--training.seq_len={seq_len}",
            f"--parallelism.context_parallel_degree={cp}",
            *MODES[mode],
        ],
    )


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def measure_rank(cfg: JobConfig, world_size: int) -> dict[str, int]:
    """Held and peak bytes of this rank's training step (the process group, if any, is up)."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    args = resolve_args(cfg.model, VOCAB, cfg.training.seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, dims, args, cross_entropy_loss, device).model
    optimizer = build_optimizer(model, cfg.optimizer)
    tokens = torch.randint(0, VOCAB, (cfg.training.local_batch_size, cfg.training.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    context_parallel = ContextParallel.from_dims(dims)
    if context_parallel is not None:  # this rank's chunks, as the trainer feeds them
        inputs, labels = context_parallel.shard(inputs), context_parallel.shard(labels)

    def forward() -> torch.Tensor:
        if cfg.training.loss_chunk_len:
            return model(inputs, labels_bs=labels)
        return cross_entropy_loss(model(inputs), labels)

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = resident_kib("VmRSS")
    forward().backward()
    peak = resident_kib("VmHWM") - before
    optimizer.zero_grad(set_to_none=True)
    # Last, a forward whose graph is dropped instead of run backward (nothing follows it).
    loss = forward()
    with_graph = resident_kib("VmRSS")
    del loss
    held = with_graph - resident_kib("VmRSS")
    return {"held": held * 1024, "peak": peak * 1024}


def rank_main(cfg: JobConfig, rank: int, world_size: int, init_file: str, send) -> None:
    """A forked rank: join the group, measure, send the result (or the error) to the parent."""
    try:
        if world_size > 1:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{init_file}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=RANK_TIMEOUT_S),
            )
        send.send(measure_rank(cfg, world_size))
    except Exception as err:  # reported by the parent, with the point named
        send.send(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def receive_result(child: multiprocessing.Process, receive) -> dict[str, int] | str:
    """A rank's measurement, or why there is none."""
    try:
        if receive.poll(RANK_TIMEOUT_S):
            return receive.recv()
        return f"no result in {RANK_TIMEOUT_S} s"
    except EOFError:
        child.join()
        return f"a rank died with exit code {child.exitcode}"


def run_point(mode: str, seq_len: int, cp: int) -> dict[str, int]:
    """Measure one point in `cp` forked ranks (none inherits another point's allocations); the
    largest rank's held and peak."""
    cfg = job_config(mode, seq_len, cp)
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        ranks = []
        for rank in range(cp):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=rank_main, args=(cfg, rank, cp, f"{tmp}/init", send))
            child.start()
            send.close()  # the child's end: a child that dies unheard closes the pipe
            ranks.append((child, receive))
        results = [receive_result(child, receive) for child, receive in ranks]
        for child, _ in ranks:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError(f"{mode}, cp {cp}, {seq_len} tokens: {'; '.join(errors)}")
    return {key: max(r[key] for r in results) for key in ("held", "peak")}


def step_peak(memory: MemoryEstimate) -> int:
    """The planned peak above what stays resident between steps (parameters, optimizer state)."""
    return (
        memory.activations
        + memory.backward_working
        + memory.gradients
        + memory.gathered_weights
        + memory.gradient_buffers
    )


def planned_point(mode: str, seq_len: int, cp: int) -> dict[str, int]:
    """The planner's held (activations) and step peak for the point, the largest rank's."""
    options = EstimateOptions(
        world_size=cp, vocab_size=VOCAB, memory=MemoryOptions(device="cpu"), ranks="all"
    )
    memories = [r.memory for r in plan(job_config(mode, seq_len, cp), options).ranks]
    return {
        "held": max(m.activations for m in memories),
        "peak": max(step_peak(m) for m in memories),
    }


def table(points: list[dict]) -> str:
    lines = [
        "| mode | cp | tokens | step peak MiB (MiB/1K tok) | planned MiB (measured ÷ planned) "
        "| held MiB | planned activations MiB (measured ÷ planned) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        measured, planned = p["measured"], p["planned"]
        peak, held = measured["peak"] / 2**20, measured["held"] / 2**20
        lines.append(
            f"| {p['mode']} | {p['cp']} | {p['seq_len']:,} "
            f"| {peak:.1f} ({peak * 1024 / p['seq_len']:.2f}) "
            f"| {planned['peak'] / 2**20:.1f} ({measured['peak'] / planned['peak']:.2f}) "
            f"| {held:.1f} "
            f"| {planned['held'] / 2**20:.1f} ({measured['held'] / planned['held']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--cp",
        type=int,
        nargs="+",
        default=[1, 2],
        help="context-parallel degrees (ranks a point runs on)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 512 and 1,024 tokens, logits and chunked, cp 1 and 2",
    )
    args = parser.parse_args(argv)
    if args.quick:
        lengths, modes, cps = QUICK_LENGTHS, QUICK_MODES, QUICK_CP
    else:
        lengths, modes, cps = args.lengths, args.modes, args.cp
    points = []
    for mode in modes:
        for cp in cps:
            for seq_len in lengths:
                point = {"mode": mode, "cp": cp, "seq_len": seq_len}
                point["measured"] = run_point(mode, seq_len, cp)
                point["planned"] = planned_point(mode, seq_len, cp)
                points.append(point)
                print(table([point]).splitlines()[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": FLAVOR,
        "batch": 1,
        "dtype": "float32",
        "loss_chunk_len": LOSS_CHUNK_LEN,
        "points": points,
    }
    (args.out / "bench_long_context.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
