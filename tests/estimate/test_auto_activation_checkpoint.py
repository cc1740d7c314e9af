"""`activation_checkpoint.mode = "auto"` picks the cheapest mode whose plan fits the budget."""

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.distributed.activation_checkpoint import apply_activation_checkpointing
from arbor_titan.estimate import EstimateOptions, MemoryOptions, plan
from arbor_titan.estimate.auto_ac import (
    GIB,
    MODES_BY_COST,
    choose_activation_checkpoint,
    choose_for_training,
    with_mode,
)
from tests.conftest import REPO

WORLD = 2


@pytest.fixture(scope="module")
def config():
    path = REPO / "train_configs" / "debug_model.toml"
    return load_config(str(path), ["--activation_checkpoint.mode=auto"])


@pytest.fixture(scope="module")
def peaks(config) -> dict[str, float]:
    """The planner's peak per process of each mode, in GiB."""
    found = {}
    for mode in MODES_BY_COST:
        result = plan(with_mode(config, mode), EstimateOptions(world_size=WORLD))
        found[mode] = max(r.memory.total for r in result.ranks) / GIB
    return found


def test_the_modes_save_memory_in_order(peaks):
    assert peaks["none"] > peaks["selective"] > peaks["full"]


@pytest.mark.parametrize("chosen", MODES_BY_COST)
def test_the_cheapest_mode_that_fits_is_chosen(config, peaks, chosen):
    budget = peaks[chosen] + 1e-4  # fits this mode, not the one before it
    cfg, reason = choose_activation_checkpoint(config, WORLD, MemoryOptions(capacity_gib=budget))
    assert cfg.activation_checkpoint.mode == chosen
    assert f"chose {chosen!r}" in reason and f"{peaks[chosen]:.3f} GiB" in reason


def test_nothing_fits_is_an_error_with_the_planners_figures(config, peaks):
    budget = MemoryOptions(capacity_gib=peaks["full"] - 1e-3)
    with pytest.raises(ValueError, match="no mode fits .* full") as error:
        choose_activation_checkpoint(config, WORLD, budget)
    assert "training.local_batch_size" in str(error.value)


def test_training_plans_in_a_child_process(config, peaks):
    budget = peaks["selective"] + 1e-4
    cfg, reason = choose_for_training(config, WORLD, budget, "cuda")
    assert cfg.activation_checkpoint.mode == "selective"
    assert "chose 'selective'" in reason


def test_an_unresolved_auto_never_reaches_the_model(config):
    with pytest.raises(ValueError, match="must be resolved"):
        apply_activation_checkpointing({}, config.activation_checkpoint)
