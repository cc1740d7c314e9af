"""`checkpoint.create_seed_checkpoint`: the initialized run saved as step-0, no step trained."""

import pytest
from torch.distributed.checkpoint import FileSystemReader

from arbor_titan.checkpoint.config import CheckpointConfig
from arbor_titan.checkpoint.folders import find_damage
from tests.conftest import run_training


def test_seed_checkpoint_is_a_complete_step_0(dump_folder):
    result = run_training(dump_folder, "seed", "--checkpoint.create_seed_checkpoint=true")
    folders = sorted(p.name for p in (dump_folder / "seed" / "checkpoints").iterdir())
    assert folders == ["step-0"]
    seed = dump_folder / "seed" / "checkpoints" / "step-0"
    assert find_damage(seed) is None
    saved = FileSystemReader(seed).read_metadata().state_dict_metadata
    assert any(key.startswith("optimizer.") for key in saved)  # a run can resume from it
    assert "step    1" not in result.stdout + result.stderr


def test_seed_checkpoint_needs_checkpoints_enabled():
    with pytest.raises(ValueError, match="create_seed_checkpoint = true needs checkpoint.enable"):
        CheckpointConfig(enable=False, create_seed_checkpoint=True)
