"""Load settings take effect or stop the run: `initial_load_path` loads with checkpointing off,
and a weights-only checkpoint refuses to pose as a resumable one."""

import pytest

from tests.conftest import losses, run_training


@pytest.fixture(scope="module")
def weights_only(dump_folder):
    """A 4-step run whose final (and only) checkpoint holds model weights only."""
    run_training(
        dump_folder,
        "final_weights",
        "--training.steps=4",
        "--checkpoint.interval=4",
        "--checkpoint.model_weights_only=true",
    )
    return dump_folder / "final_weights" / "checkpoints" / "step-4"


def test_initial_load_path_loads_with_checkpointing_disabled(dump_folder, weights_only):
    result = run_training(
        dump_folder,
        "from_weights",
        "--training.steps=1",
        "--checkpoint.enable=false",
        f"--checkpoint.initial_load_path={weights_only}",
    )
    assert f"initialized model weights from {weights_only}" in result.stdout + result.stderr
    # Same seed and data as the first run's step 1, but from its trained weights.
    assert losses(dump_folder, "from_weights")[1] < losses(dump_folder, "final_weights")[1] - 0.1
    assert not (dump_folder / "from_weights" / "checkpoints").exists()  # nothing saved


def test_resuming_from_a_weights_only_checkpoint_stops_and_says_why(dump_folder, weights_only):
    result = run_training(dump_folder, "final_weights", "--training.steps=8", check=False)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"{weights_only} holds model weights only" in line
    assert "--checkpoint.load_step" in line and "--checkpoint.initial_load_path" in line
