"""The README's first command: run_train.sh trains, and the figures land in TensorBoard and
metrics.jsonl under stable names."""

import json
import os
import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import FAST_TRAINING, REPO


def test_run_train_logs_to_tensorboard_and_jsonl(dump_folder):
    result = subprocess.run(
        [
            str(REPO / "run_train.sh"),
            f"--job.dump_folder={dump_folder}",
            "--job.name=e2e",
            *FAST_TRAINING,
            "--training.steps=30",
            "--metrics.log_freq=5",
            "--validation.enable=true",
            "--validation.freq=15",
            "--validation.steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = dump_folder / "e2e"

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "memory_gib"):
        assert all(isinstance(r[key], float) for r in steps), key
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # the loss clearly falls
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("loss/train", "optim/lr", "throughput/tokens_per_second", "loss/val"):
        assert tag in scalars, (tag, scalars)
    tb_loss = {e.step: e.value for e in events.Scalars("loss/train")}
    assert tb_loss == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in steps}
    assert events.Scalars("throughput/tokens_per_second")[-1].value > 0
    assert (run_dir / "config.toml").read_text().count("[training]") == 1


@pytest.mark.parametrize("nproc", [1, 2])
def test_run_train_ends_with_the_first_ranks_error_once(nproc):
    """torchrun's failure report comes first; the user's one-line error is the last line."""
    result = subprocess.run(
        [str(REPO / "run_train.sh"), "--training.stepz=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NGPU": str(nproc)},
    )
    error = "error: command line: unknown key 'training.stepz'; did you mean 'training.steps'?"
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stderr.rstrip("\n").splitlines()[-1] == error
    assert output.count(error) == 1
    assert "ChildFailedError" not in output and "Traceback" not in output
