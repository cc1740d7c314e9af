"""A rank killed mid-run: torchrun restarts the job, which resumes from the newest checkpoint
and finishes with the per-step losses of an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, losses, run_training

FAULT = str(Path(__file__).with_name("fault_train.py"))
# Two FSDP processes, three steps, a checkpoint after step 2; the watchdog armed, never firing.
RUN = ["--training.steps=3", "--checkpoint.interval=2", "--training.hang_timeout_s=300"]


def launcher(*torchrun_args: str) -> list[str]:
    """run_train.sh's launcher (torchrun with the training's own last error)."""
    return [
        sys.executable,
        "-m",
        "arbor_titan.launch",
        "--standalone",
        "--nproc_per_node=2",
        *torchrun_args,
    ]


def test_killed_rank_restarts_and_matches_an_uninterrupted_run(dump_folder):
    run_training(dump_folder, "restart_straight", *RUN, script=launcher("-m", "arbor_titan.train"))
    killed = run_training(
        dump_folder,
        "restart_killed",
        *RUN,
        script=launcher("--max-restarts=1", FAULT, "--kill-rank-at-step", "1:3"),
    )
    output = killed.stdout + killed.stderr
    assert "restart 1 of at most 1: resuming from the newest checkpoint" in output
    assert "resumed from" in output and "step-2" in output
    assert losses(dump_folder, "restart_killed") == losses(dump_folder, "restart_straight")
    # The watchdog removes its stacks files when training ends without a hang.
    assert not list((dump_folder / "restart_killed").glob("hang-stacks-*"))


def test_run_train_rejects_a_bad_max_restarts():
    result = subprocess.run(
        ["./run_train.sh"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "MAX_RESTARTS": "two"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: MAX_RESTARTS must be a whole number >= 0, got 'two'"
    )
