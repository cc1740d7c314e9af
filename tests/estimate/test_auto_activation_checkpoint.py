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
from arbor_titan.estimate.plan import planned_length
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


def test_training_chooses_for_the_context_schedules_longest_stage():
    """The schedule ends at 1,024 × 12 tokens a micro-batch (no keep_tokens_per_step), 4× its
    start: a budget that fits the start without checkpointing must not leave the last stage
    without it."""
    path = REPO / "train_configs" / "debug_context.toml"
    cfg = load_config(
        str(path), ["--activation_checkpoint.mode=auto", "--context.keep_tokens_per_step=false"]
    )
    longest = planned_length(cfg).config
    assert longest.training.seq_len == 1024 and longest.training.local_batch_size == 12
    result = plan(with_mode(longest, "selective"), EstimateOptions(world_size=WORLD))
    budget = max(r.memory.total for r in result.ranks) / GIB + 1e-4
    # Planned at its start alone, the config would run without checkpointing.
    assert choose_activation_checkpoint(cfg, WORLD, MemoryOptions(capacity_gib=budget))[0] == (
        with_mode(cfg, "none")
    )
    chosen, reason = choose_for_training(cfg, WORLD, budget, "cuda")
    assert chosen == with_mode(cfg, "selective")  # the config keeps its own seq_len and batch
    assert "planned at 1,024 tokens × local_batch_size 12, the longest stage of" in reason


def test_an_unresolved_auto_never_reaches_the_model(config):
    with pytest.raises(ValueError, match="must be resolved"):
        apply_activation_checkpointing({}, config.activation_checkpoint)
