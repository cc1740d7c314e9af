#!/usr/bin/env python
"""The GPU check's steps and summary (scripts/gpu_check.sh chooses the Python and runs this).

    python scripts/gpu_check.py [--out DIR] [--work DIR] [--wheels DIR] [--budget-s S]
                                [--only STEP,...] [--plumbing]

Installs the carried wheels (`--wheels`, default .whl) with `pip --no-index` into a temporary
folder that every step imports first, then runs the steps one after another, each under its
own `timeout` and all within `--budget-s`; a step that would start past the budget is skipped.
The planner and the 799m run's tokenizer work on CPU in the background meanwhile.

Steps: `env` (GPU, torch, CUDA, flash SDPA, read bandwidth, the carried packages); bf16 eager
and compiled training of the `bench` flavor and of the 799m flavor at 16 x 4096 tokens per
step (the planner puts it at ~97 of the H200's 141 GiB); float8 tensorwise and rowwise 799m
runs against the compiled bf16 one; `decode`, scripts/generate.py --compile on the bf16 799m
run's weights against the bandwidth roofline; `plan`, the planner's estimate of the 799m run
against its measured peak memory; `bench_long_context`, one 64K-token sequence of `bench` (chunked
loss, full activation checkpointing) against `plan_long`. On a machine with 2 GPUs or more,
the same sequence also trains over 2 context-parallel ranks with each cp attention
(`bench_cp2_all_gather`, `bench_cp2_torch_ring`), whose losses must match the one-GPU run's.

`--plumbing` runs the same steps on CPU at toy sizes without compiling, to test this script.

Into `--out` (default $OUT, else outputs/gpu_check) go three files: gpu_check.log (everything
printed), summary.json and runs.tar.gz (each step's log, metrics and configs). Training runs,
caches and checkpoints stay in `--work`. Exits 0 when every step passed and float8's loss is
within 2% of bf16's, 1 otherwise, 2 when the environment step fails.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
FLOAT8_LOSS_TOLERANCE = 0.02  # relative; float8's loss after the same steps as bf16's
CP_LOSS_TOLERANCE = 0.01  # relative; a cp run's loss against one GPU's on the same batches
CP_RUNS = ("bench_cp2_all_gather", "bench_cp2_torch_ring")
KILL_GRACE_S = 15  # after a step's timeout, SIGKILL follows SIGTERM this much later
MIN_STEP_S = 1  # a step with less of the budget left is skipped

COMMON = [
    "--training.mixed_precision_param=bfloat16",
    "--validation.enable=false",
    "--checkpoint.enable=false",
    "--metrics.enable_tensorboard=false",
]


@dataclass(frozen=True)
class Sizes:
    """What differs between the check on a GPU and its CPU plumbing run."""

    device: str
    small: list[str]  # the bench flavor's run
    large: list[str]  # the 799m flavor's run
    compile: bool  # whether the runs named `_compile` compile (not in the plumbing run)
    decode_tokens: int
    bandwidth_mib: int
    gpu_memory_gib: float  # the planner's capacity
    long: list[str]  # the bench flavor's one-sequence long-context run (memory linear in length)


TOY = [
    "--model.flavor=debug",
    "--data.max_files=50",
    "--tokenizer.vocab_size=512",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--training.gradient_accumulation_steps=1",
    "--training.steps=2",
    "--metrics.log_freq=1",
    "--lr_scheduler.warmup_steps=1",
]
GPU_SIZES = Sizes(
    device="cuda",
    # Each run's figures are its last logged window, steps 11-20: after compilation (step 1)
    # and the recompilations a changing learning rate or shape may cause early on. 1,000
    # stdlib files (~3M tokens at the 799m's vocabulary) feed 20 steps, and keep tokenizer
    # training and the token cache short.
    small=[
        "--data.max_files=1000",
        "--training.seq_len=1024",
        "--training.local_batch_size=32",
        "--training.steps=20",
        "--metrics.log_freq=10",
        "--lr_scheduler.warmup_steps=5",
    ],
    large=[
        "--data.max_files=1000",
        "--training.local_batch_size=16",
        "--training.gradient_accumulation_steps=1",
        "--training.steps=20",
        "--metrics.log_freq=10",
        "--lr_scheduler.warmup_steps=5",
    ],
    compile=True,
    decode_tokens=256,
    bandwidth_mib=4096,
    gpu_memory_gib=141,
    # One GPU, so no context-parallel ranks: one 64K-token sequence with the chunked loss and
    # full activation checkpointing, whose peak the planner must predict at that length.
    long=[
        "--data.max_files=1000",
        "--training.seq_len=65536",
        "--training.local_batch_size=1",
        "--training.loss_chunk_len=4096",
        "--activation_checkpoint.mode=full",
        "--training.steps=4",
        "--metrics.log_freq=2",
        "--lr_scheduler.warmup_steps=1",
    ],
)
PLUMBING_SIZES = Sizes(
    "cpu",
    TOY,
    TOY,
    False,
    8,
    64,
    141,
    [
        *TOY,
        "--training.seq_len=256",
        "--training.local_batch_size=1",
        "--training.loss_chunk_len=64",
        "--activation_checkpoint.mode=full",
    ],
)


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    background: bool = False  # CPU-only work that runs beside the GPU steps
    after: tuple[str, ...] = ()  # background steps to wait for first


@dataclass
class StepResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    returncode: int | None = None
    note: str = ""


# fmt: off
def train_step(
    name: str, config: str, group: Path, overrides: list[str], timeout_s: float, nproc: int = 1,
    **kwargs
) -> Step:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    argv = [*launcher, "-m", "arbor_titan.train", f"train_configs/{config}",
            f"--job.dump_folder={group}", f"--job.name={name}", *COMMON, *overrides]
    return Step(name, argv, timeout_s, **kwargs)


def prepare_step(name: str, config: str, group: Path, overrides: list[str]) -> Step:
    """Tokenizer training and the token cache of a run group, on CPU beside the GPU steps."""
    argv = [sys.executable, "scripts/gpu_check.py", "prepare", config,
            f"--job.dump_folder={group}", *overrides]
    return Step(name, argv, 300, background=True)


def plan_steps(sizes: Sizes, work: Path, site: Path, gpus: int = 1) -> list[Step]:
    """Every step, most important first (a budget overrun skips the last); the context-parallel
    runs only where there are 2 GPUs for their ranks."""
    small, large = work / "bench", work / "799m"
    compiled = [f"--compile.enable={str(sizes.compile).lower()}"]
    eager = ["--compile.enable=false"]
    # The compiled bf16 run also leaves its weights for the decode step.
    weights = ["--checkpoint.enable=true", "--checkpoint.model_weights_only=true",
               "--checkpoint.async_mode=disabled", "--checkpoint.interval=1000000"]
    float8 = ["--float8.enable_float8_linear=true"]
    checkpoint = large / "799m_bf16_compile" / "checkpoints"
    checkpoint /= f"step-{override(sizes.large, 'training.steps')}"
    python = sys.executable
    env = [python, "scripts/gpu_env.py", "--json", str(work / "env.json"), "--device",
           sizes.device, "--site", str(site), "--bandwidth-mib", str(sizes.bandwidth_mib)]
    def planner(config: str, out: str, overrides: list[str]) -> list[str]:
        return [python, "-m", "arbor_titan.estimate", f"train_configs/{config}", "--world-size",
                "1", "--gpu-memory-gib", str(sizes.gpu_memory_gib), "--reserve-gib", "0",
                "--json", str(work / out), *COMMON, *overrides]
    decode = [python, "scripts/generate.py", "--checkpoint", str(checkpoint), "--dtype",
              "bfloat16", "--device", sizes.device, "--prompt", "def fibonacci(n):",
              "--max-new-tokens", str(sizes.decode_tokens), "--temperature", "0",
              *(["--compile"] if sizes.compile else [])]
    def cp_run(name: str) -> Step:
        cp = ["--parallelism.context_parallel_degree=2",
              f"--parallelism.context_parallel_attention={name.removeprefix('bench_cp2_')}"]
        return train_step(name, "bench.toml", small, [*sizes.long, *eager, *cp], 120, nproc=2)
    return [
        Step("env", env, 120),
        prepare_step("prepare_bench", "bench.toml", small, sizes.small),
        prepare_step("prepare_799m", "arbor_799m.toml", large, sizes.large),
        Step("plan", planner("arbor_799m.toml", "plan.json", sizes.large), 180, background=True),
        Step("plan_long", planner("bench.toml", "plan_long.json", [*sizes.long, *eager]), 180,
             background=True),
        train_step("bench_bf16_eager", "bench.toml", small, [*sizes.small, *eager], 150,
                   after=("prepare_bench",)),
        train_step("bench_bf16_compile", "bench.toml", small, [*sizes.small, *compiled], 180),
        train_step("799m_bf16_compile", "arbor_799m.toml", large,
                   [*sizes.large, *compiled, *weights], 240, after=("prepare_799m",)),
        Step("decode", decode, 180),
        train_step("799m_float8_tensorwise_compile", "arbor_799m.toml", large,
                   [*sizes.large, *compiled, *float8, "--float8.recipe_name=tensorwise"], 240),
        train_step("799m_float8_rowwise_compile", "arbor_799m.toml", large,
                   [*sizes.large, *compiled, *float8, "--float8.recipe_name=rowwise"], 240),
        train_step("bench_long_context", "bench.toml", small, [*sizes.long, *eager], 120),
        *(cp_run(name) for name in CP_RUNS if gpus >= 2),
        train_step("799m_bf16_eager", "arbor_799m.toml", large, [*sizes.large, *eager], 180),
    ]
# fmt: on


def override(overrides: list[str], key: str) -> int:
    """The integer value of `--key=value` in `overrides` (the last one wins)."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"--{key}=")]
    if not values:
        raise KeyError(f"--{key} is not among {overrides}")
    return int(values[-1])


class Console:
    """Prints to stdout and appends to the check's log file, so $OUT holds all that was shown."""

    def __init__(self, log: TextIO):
        self.log = log
        self._lock = threading.Lock()  # background steps report from their own threads

    def __call__(self, text: str) -> None:
        with self._lock:
            for stream in (sys.stdout, self.log):
                stream.write(text if text.endswith("\n") else text + "\n")
                stream.flush()


class StepRunner:
    """Runs steps under `timeout` (which signals the step's whole process group, torchrun's
    children too) with a shared deadline; each step's output goes to logs/<name>.log."""

    def __init__(self, console: Console, logs: Path, env: dict[str, str], deadline: float):
        self.console, self.logs, self.env, self.deadline = console, logs, env, deadline
        self.results: dict[str, StepResult] = {}
        self._background: dict[str, tuple[subprocess.Popen, threading.Thread]] = {}

    def _command(self, step: Step) -> list[str] | None:
        """The step's argv under `timeout`, or None when the budget has no room for it."""
        left = self.deadline - time.monotonic()
        limit = min(step.timeout_s, left)
        if limit < MIN_STEP_S:
            self.results[step.name] = StepResult(step.name, "skipped", note="budget spent")
            self.console(f"== {step.name}: skipped, the budget is spent")
            return None
        return ["timeout", "-k", str(KILL_GRACE_S), f"{limit:.0f}", *step.argv]

    def start(self, step: Step) -> None:
        """Start a background step; `wait` collects it."""
        command = self._command(step)
        if command is None:
            return
        log = (self.logs / f"{step.name}.log").open("w", encoding="utf-8")
        self.console(f"== {step.name} (background): {' '.join(step.argv[1:])}")
        process = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        watcher = threading.Thread(
            target=self._watch, args=(step.name, process, log, time.monotonic())
        )
        watcher.start()
        self._background[step.name] = (process, watcher)

    def _watch(self, name: str, process: subprocess.Popen, log: TextIO, started: float) -> None:
        returncode = process.wait()
        log.close()
        self._finish(name, returncode, time.monotonic() - started)

    def wait(self, name: str) -> None:
        """Wait for a background step to end (it was reported when it ended)."""
        if name in self._background:
            self._background.pop(name)[1].join()

    def stop_background(self) -> None:
        """End the background steps now (timeout passes the signal on to the step)."""
        for process, watcher in self._background.values():
            process.terminate()
            watcher.join()
        self._background.clear()

    def run(self, step: Step) -> None:
        for name in step.after:
            self.wait(name)
        command = self._command(step)
        if command is None:
            return
        self.console(f"== {step.name}: {' '.join(step.argv[1:])}")
        started = time.monotonic()
        with (self.logs / f"{step.name}.log").open("w", encoding="utf-8") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",  # a step's stray bytes must not stop the check
                bufsize=1,
            )
            for line in process.stdout:
                log.write(line)
                self.console(line)
            returncode = process.wait()
        self._finish(step.name, returncode, time.monotonic() - started)

    def _finish(self, name: str, returncode: int, seconds: float) -> None:
        # timeout(1) exits 124 when it stopped the step, 137 when SIGKILL had to follow.
        status = "ok" if returncode == 0 else "timeout" if returncode in (124, 137) else "failed"
        self.results[name] = StepResult(name, status, round(seconds, 1), returncode)
        self.console(f"== {name}: {status} in {seconds:.0f}s (exit {returncode})")
        if status != "ok":
            log = (self.logs / f"{name}.log").read_text(errors="replace")
            tail = log.splitlines()[-20:]
            self.console("   last lines:\n" + "\n".join(f"   {line}" for line in tail))


def install_wheels(wheels: Path, site: Path, console: Console) -> None:
    """Install every wheel of `wheels` into `site` offline (`--no-index --no-deps`): the folder
    holds exactly what this Python lacks (scripts/gpu_wheels.sh)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        console(
            f"gpu_check: no wheels in {wheels} (scripts/gpu_wheels.sh makes them); using "
            "only what this Python has"
        )
        return
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(site),
        *map(str, found),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        console(result.stdout + result.stderr)
        raise SystemExit(
            f"gpu_check: installing the wheels of {wheels} failed; scripts/gpu_wheels.sh makes "
            "them for CPython 3.12 on x86-64 Linux"
        )
    console(f"gpu_check: installed {len(found)} wheels from {wheels} into {site}")


def register_checkout_plugins(folder: Path) -> None:
    """Make the checkout's plugin entry points (pyproject.toml) visible without installing the
    project: a metadata-only dist-info in `folder`, where an installed copy is absent."""
    import importlib.metadata

    import tomllib

    try:
        importlib.metadata.distribution("arbor_titan")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = folder / f"arbor_titan-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: arbor_titan\nVersion: {project['version']}\n"
    )
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
            for group, points in groups.items()
        )
    )


def last_record(run_dir: Path) -> dict | None:
    """The last logged training record of a run (its last measured window)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    return steps[-1] if steps else None


def float8_comparison(runs: dict[str, dict]) -> list[dict]:
    """Each float8 run against the compiled bf16 one at the same step: speed-up and loss gap."""
    bf16 = runs.get("799m_bf16_compile")
    rows = []
    for recipe in ("tensorwise", "rowwise"):
        fp8 = runs.get(f"799m_float8_{recipe}_compile")
        if bf16 is None or fp8 is None:
            continue
        gap = fp8["loss"] / bf16["loss"] - 1
        rows.append(
            {
                "recipe": recipe,
                "speedup": fp8["tokens_per_second"] / bf16["tokens_per_second"],
                "loss_gap": gap,
                "ok": abs(gap) <= FLOAT8_LOSS_TOLERANCE,
            }
        )
    return rows


DECODE_LINE = re.compile(r"decode: (\d+) tokens in (\d+) steps at ([\d,.]+) tokens/s")


def decode_comparison(log: str, weight_bytes: int, bandwidth: float) -> dict | None:
    """generate.py's decode speed against the roofline of reading every weight once per step
    (batch 1: one token per step) at the bandwidth measured in the env step."""
    match = DECODE_LINE.search(log)
    if match is None:
        return None
    tokens_per_second = float(match.group(3).replace(",", ""))
    roofline = bandwidth / weight_bytes
    return {
        "tokens": int(match.group(1)),
        "tokens_per_second": tokens_per_second,
        "weight_bytes": weight_bytes,
        "read_bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_second": roofline,
        "roofline_fraction": tokens_per_second / roofline,
    }


def decode_weight_bytes(checkpoint: Path, bytes_per_weight: int = 2) -> int:
    """Bytes of the weights one decode step reads: all but the input embedding (a lookup)."""
    import torch

    from arbor_titan.checkpoint.folders import read_model_args
    from arbor_titan.models.arbor.model import Transformer

    with torch.device("meta"):
        model = Transformer(read_model_args(checkpoint))
    read = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return read * bytes_per_weight


def cp_comparison(runs: dict[str, dict]) -> list[dict]:
    """Each context-parallel run's loss against the one-GPU run of the same sequences."""
    one_gpu = runs.get("bench_long_context")
    rows = []
    for name in CP_RUNS:
        if one_gpu is None or name not in runs:
            continue
        gap = runs[name]["loss"] / one_gpu["loss"] - 1
        rows.append({"run": name, "loss_gap": gap, "ok": abs(gap) <= CP_LOSS_TOLERANCE})
    return rows


PLANNED_RUNS = {
    "plan": ("plan.json", ("799m_bf16_eager", "799m_bf16_compile")),
    "plan_long": ("plan_long.json", ("bench_long_context",)),
}


def plan_comparison(plan_path: Path, runs: dict[str, dict], names: tuple[str, ...]) -> dict:
    """The planner's per-GPU total (no reserve) against the peak allocated memory of the runs
    it planned."""
    plan = json.loads(plan_path.read_text())
    estimated = plan["ranks"][0]["memory_bytes"]["total"] / 2**30
    row = {"estimated_gib": estimated, "fits": plan.get("fits")}
    for name in names:
        if name in runs:
            row[f"{name}_gib"] = runs[name]["memory_gib"]
            row[f"{name}_over_estimate"] = runs[name]["memory_gib"] / estimated
    return row


@dataclass
class Summary:
    mode: str
    seconds: float
    env: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)
    float8: list[dict] = field(default_factory=list)
    context_parallel: list[dict] = field(default_factory=list)
    decode: dict | None = None
    plans: dict[str, dict] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ok: bool = False


def summarize(mode: str, seconds: float, work: Path, results: dict[str, StepResult]) -> Summary:
    """Everything the steps left, compared. A comparison that fails is recorded in `errors`
    rather than raised: the figures the other steps measured must reach summary.json."""
    summary = Summary(mode, round(seconds, 1), steps=[asdict(r) for r in results.values()])
    if (work / "env.json").is_file():
        summary.env = json.loads((work / "env.json").read_text())
    for name, result in results.items():
        record = last_record(work / ("bench" if name.startswith("bench") else "799m") / name)
        if result.status == "ok" and record is not None:
            summary.runs[name] = record
    summary.float8 = float8_comparison(summary.runs)
    summary.context_parallel = cp_comparison(summary.runs)

    def decode() -> dict | None:
        checkpoint = next((work / "799m" / "799m_bf16_compile" / "checkpoints").glob("step-*"))
        log = (work / "logs" / "decode.log").read_text(errors="replace")
        bandwidth = summary.env["read_bandwidth_bytes_per_s"]
        return decode_comparison(log, decode_weight_bytes(checkpoint), bandwidth)

    def compared(name: str, compare: Callable[[], dict | None]) -> dict | None:
        if name not in results or results[name].status != "ok":
            return None
        try:
            return compare()
        except Exception as err:  # recorded, and the check fails
            summary.errors.append(f"{name}: {type(err).__name__}: {err}")
            return None

    summary.decode = compared("decode", decode)
    for name, (plan_file, runs) in PLANNED_RUNS.items():
        row = compared(name, partial(plan_comparison, work / plan_file, summary.runs, runs))
        if row is not None:
            summary.plans[name] = row
    carried_ok = all(p["imports"] and not p["unmet"] for p in summary.env.get("carried", []))
    summary.ok = (
        carried_ok
        and not summary.errors
        and all(r.status == "ok" for r in results.values())
        and all(row["ok"] for row in [*summary.float8, *summary.context_parallel])
    )
    return summary


def format_summary(summary: Summary) -> Iterator[str]:
    env = summary.env
    yield (
        f"\nmachine: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), Python {env.get('python')}"
    )
    if "flash_sdp_enabled" in env:
        yield (
            f"flash SDPA built: {env['flash_attention_built']}, enabled: "
            f"{env['flash_sdp_enabled']}, used by the model's attention: "
            f"{env['flash_sdp_used']} ({', '.join(env['attention_kernels'])})"
        )
    if "read_bandwidth_bytes_per_s" in env:
        yield f"read bandwidth: {env['read_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s"
    yield f"\n{'run':<32} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9} {'loss':>8}"
    for name, r in summary.runs.items():
        yield (
            f"{name:<32} {r['tokens_per_second']:>12,.0f} {r['mfu']:>7.1%} "
            f"{r['memory_gib']:>9.2f} {r['loss']:>8.4f}"
        )
    for row in summary.float8:
        yield (
            f"float8 {row['recipe']} vs bf16 (compiled 799m): {row['speedup']:.2f}x tokens/s, "
            f"loss {row['loss_gap']:+.2%} {'ok' if row['ok'] else 'FAIL'}"
        )
    for row in summary.context_parallel:
        yield (
            f"{row['run']} vs one GPU (64K tokens): loss {row['loss_gap']:+.2%} "
            f"{'ok' if row['ok'] else 'FAIL'}"
        )
    if summary.decode:
        d = summary.decode
        yield (
            f"decode (799m bf16, batch 1): {d['tokens_per_second']:,.1f} tokens/s, "
            f"{d['roofline_fraction']:.0%} of the {d['roofline_tokens_per_second']:,.0f} "
            "tokens/s roofline"
        )
    for name, p in summary.plans.items():
        measured = ", ".join(
            f"{run} {p[f'{run}_gib']:.2f} GiB ({p[f'{run}_over_estimate']:.0%})"
            for run in PLANNED_RUNS[name][1]
            if f"{run}_gib" in p
        )
        yield f"planner {name} (no reserve): {p['estimated_gib']:.2f} GiB; measured {measured}"
    for error in summary.errors:
        yield f"summary error: {error}"
    failed = [s["name"] for s in summary.steps if s["status"] != "ok"]
    yield f"\ngpu_check: {'passed' if summary.ok else 'FAILED'} in {summary.seconds:.0f}s" + (
        f" (not ok: {', '.join(failed)})" if failed else ""
    )


def prepare(argv: list[str]) -> int:
    """Train the tokenizer and fill the token cache of a config where its run will look."""
    from arbor_titan.config.cli import load_config
    from arbor_titan.data import prepare_data

    cfg = load_config(REPO / "train_configs" / argv[0], argv[1:])
    prepare_data(cfg.data, cfg.tokenizer, Path(cfg.job.dump_folder) / "cache", False)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "outputs/gpu_check")
    )
    parser.add_argument("--work", type=Path, default=Path("outputs/gpu_check_work"))
    parser.add_argument("--wheels", type=Path, default=Path(".whl"))
    parser.add_argument("--budget-s", type=float, default=450, help="all steps together")
    parser.add_argument("--only", help="comma-separated step names (default: all)")
    parser.add_argument("--plumbing", action="store_true", help="toy sizes on CPU")
    return parser.parse_args(argv)


def select(steps: list[Step], only: str | None) -> list[Step]:
    if only is None:
        return steps
    wanted = only.split(",")
    unknown = sorted(set(wanted) - {s.name for s in steps})
    if unknown:
        known = ", ".join(s.name for s in steps)
        raise SystemExit(f"gpu_check: --only names unknown steps {unknown}; steps: {known}")
    return [s for s in steps if s.name in wanted]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        return prepare(argv[1:])
    args = parse_args(argv)
    started = time.monotonic()
    out, work = args.out.resolve(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    for folder in (out, work / "logs"):
        folder.mkdir(parents=True, exist_ok=True)
    sizes = PLUMBING_SIZES if args.plumbing else GPU_SIZES
    site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    try:
        with (out / "gpu_check.log").open("w", encoding="utf-8") as log:
            console = Console(log)
            install_wheels(args.wheels.resolve(), site, console)
            runner = StepRunner(
                console, work / "logs", step_env(site, work, args.plumbing), started + args.budget_s
            )
            steps = plan_steps(sizes, work, site, 0 if args.plumbing else cuda_devices())
            env_ok = run_steps(runner, select(steps, args.only))
            summary = summarize(
                "plumbing" if args.plumbing else "gpu",
                time.monotonic() - started,
                work,
                runner.results,
            )
            (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
            for line in format_summary(summary):
                console(line)
        archive(work, out / "runs.tar.gz")
    finally:
        shutil.rmtree(site, ignore_errors=True)
    return 2 if not env_ok else 0 if summary.ok else 1


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def step_env(site: Path, work: Path, plumbing: bool) -> dict[str, str]:
    """The steps' environment: the carried wheels, the checkout and its plugin entry points
    importable first (also here, for the summary); one compile cache for every run."""
    metadata = work / "metadata"
    register_checkout_plugins(metadata)
    paths = [str(site), str(REPO), str(metadata)]
    sys.path[:0] = paths
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
    }
    if plumbing:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_steps(runner: StepRunner, steps: list[Step]) -> bool:
    """Background steps first, then the others in order; False (and nothing more run) when the
    environment step fails."""
    for step in steps:
        if step.background:
            runner.start(step)
    for step in steps:
        if step.background:
            continue
        runner.run(step)
        if step.name == "env" and runner.results["env"].status != "ok":
            runner.console("gpu_check: the environment step failed; nothing else runs")
            runner.stop_background()
            return False
    for step in steps:
        runner.wait(step.name)
    return True


def archive(work: Path, path: Path) -> None:
    """Each step's log, the env and plan JSON, and every run's metrics and config."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
        for pattern in ("*.json", "*/*/metrics.jsonl", "*/*/config.toml"):
            for found in sorted(work.glob(pattern)):
                tar.add(found, arcname=str(found.relative_to(work)))


if __name__ == "__main__":
    sys.exit(main())
