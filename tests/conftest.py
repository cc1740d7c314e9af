"""Shared fixtures: one small corpus cache for every end-to-end run of the session."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Unit tests use tiny tensors, where a second thread costs more than it saves (and on a busy
# machine far more); the training subprocesses keep their own thread settings.
torch.set_num_threads(1)

# Small and fast: 200 stdlib files, a vocab-512 tokenizer, the debug model at seq 64.
FAST_TRAINING = [
    "--data.max_files=200",
    "--tokenizer.vocab_size=512",
    "--training.seq_len=64",
    "--training.local_batch_size=4",
    "--lr_scheduler.warmup_steps=2",
    "--metrics.log_freq=1",
    "--validation.enable=false",
]


def dev_dependency(name: str) -> ModuleType | None:
    """A package of the `dev` extra, or None where it is not installed (its tests then skip).

    scripts/test.sh installs the extra and sets ARBOR_REQUIRE_DEV_DEPS=1: there a missing
    package is an error, so a broken environment can't pass by skipping what it can't run.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if os.environ.get("ARBOR_REQUIRE_DEV_DEPS") == "1":
            raise ImportError(
                f"{name} is missing but ARBOR_REQUIRE_DEV_DEPS=1 (scripts/test.sh) needs every "
                "package of the dev extra: pip install -e .[dev]"
            ) from error
        return None


def import_or_skip(name: str) -> ModuleType:
    """`pytest.importorskip` for a package of the `dev` extra (see `dev_dependency`)."""
    module = dev_dependency(name)
    if module is None:
        pytest.skip(f"needs {name} (pip install -e .[dev])", allow_module_level=True)
    return module


@pytest.fixture(scope="session")
def dump_folder(tmp_path_factory) -> Path:
    """A dump folder shared by the session's runs, so the tokenizer is trained once."""
    return tmp_path_factory.mktemp("outputs")


def train_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "arbor_titan.train"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "arbor_titan.train",
    ]


def run_training(
    dump_folder: Path,
    job: str,
    *overrides: str,
    nproc: int = 1,
    script: list[str] | None = None,
    check: bool = True,
    timeout: float = 300,
    config: str = "debug_model.toml",
) -> subprocess.CompletedProcess:
    """Train a config of train_configs/ (the debug model's by default) in a subprocess
    (torchrun when nproc > 1)."""
    command = (script or train_command(nproc)) + [
        str(REPO / "train_configs" / config),
        f"--job.dump_folder={dump_folder}",
        f"--job.name={job}",
        *FAST_TRAINING,
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        raise AssertionError(f"training failed ({result.returncode}):\n{output}")
    return result


def step_metrics(dump_folder: Path, job: str) -> dict[int, dict]:
    """Per-step training records of metrics.jsonl (the last record wins for a repeated step)."""
    records = {}
    for line in (dump_folder / job / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record and "loss" in record:
            records[record["step"]] = record
    return records


def losses(dump_folder: Path, job: str) -> dict[int, float]:
    return {step: r["loss"] for step, r in step_metrics(dump_folder, job).items()}
