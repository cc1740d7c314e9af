"""`growth.init = "random"`: the operators' shapes without their values, the control arm that
separates function preservation from mere progressive size (scripts/bench_growth.py)."""

import pytest
import torch
from growth_testing import TINY, batch, build, random_model

from arbor_titan.config.cli import load_config
from arbor_titan.config.loader import ConfigError
from arbor_titan.growth import Growth, plan_growth
from arbor_titan.models.arbor.args import FLAVORS
from tests.conftest import REPO


def grown_pair(op: str, params: dict):
    """The same model grown by `op` with its own values and with random new entries."""
    model = random_model(TINY)
    state = model.state_dict()
    exact = Growth.create(op, TINY, params, seed=1)
    random = Growth.create(op, TINY, params, seed=1, init="random")
    return model, exact, random, exact.model_state(state), random.model_state(state)


@pytest.mark.parametrize(
    ("op", "params"), [("clone_width", {"factor": 2}), ("deepen", {"layers": [0, 1]})]
)
def test_random_init_keeps_the_shapes_but_not_the_function(op, params):
    model, exact, random, exact_state, random_state = grown_pair(op, params)
    assert {k: v.shape for k, v in random_state.items()} == {
        k: v.shape for k, v in exact_state.items()
    }
    x = batch(TINY.vocab_size)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(build(exact.new_args, exact_state)(x), before)
        moved = (build(random.new_args, random_state)(x) - before).abs().max()
    assert moved > 0.1  # the negative of the exactness check: the logits move by O(1)


def test_old_tensors_keep_their_leading_block_and_new_entries_are_fresh():
    model, _, random, exact_state, random_state = grown_pair("clone_width", {"factor": 2})
    old = model.state_dict()
    wq, grown_wq = old["layers.0.attention.wq.weight"], random_state["layers.0.attention.wq.weight"]
    rows, cols = wq.shape
    assert torch.equal(grown_wq[:rows, :cols], wq)
    fresh = grown_wq[rows:, cols:]
    assert float(fresh.std()) == pytest.approx(
        float(wq.std()), rel=0.2
    )  # at the scale of the old tensor
    assert not torch.equal(fresh, exact_state["layers.0.attention.wq.weight"][rows:, cols:])
    gain = random_state["layers.0.attention_norm.weight"]
    assert torch.equal(gain[: TINY.dim], old["layers.0.attention_norm.weight"])
    assert torch.equal(gain[TINY.dim :], torch.ones(TINY.dim, dtype=gain.dtype))
    # The writers are random too: nothing is zeroed to keep the function.
    assert random_state["layers.0.feed_forward.w2.weight"][TINY.dim :].abs().min() > 0


def test_optimizer_state_is_kept_on_old_entries_and_zero_on_new_ones():
    random = Growth.create("deepen", TINY, {"layers": [0]}, init="random")
    moment = torch.rand(TINY.ffn_dim, TINY.dim)
    grown = random.grow_moment("layers.0.feed_forward.w1.weight", "exp_avg", moment)
    assert torch.equal(grown["layers.0.feed_forward.w1.weight"], moment)
    assert not grown["layers.1.feed_forward.w1.weight"].any()  # the new layer
    steps = random.grow_step("layers.0.feed_forward.w1.weight", torch.tensor(7.0))
    assert steps == {
        "layers.0.feed_forward.w1.weight": torch.tensor(7.0),
        "layers.1.feed_forward.w1.weight": torch.tensor(0.0),
    }
    clone = Growth.create("clone_width", TINY, {"factor": 2}, init="random")
    moment = torch.rand(TINY.dim)
    grown = clone.grow_moment("norm.weight", "exp_avg_sq", moment)["norm.weight"]
    assert torch.equal(grown[: TINY.dim], moment) and not grown[TINY.dim :].any()


def test_growth_init_reaches_every_stage_and_rejects_unknown_values():
    cfg = load_config(
        REPO / "train_configs/bench_growth_grown.toml", ["--growth.init=random"]
    ).growth
    assert [g.init for g in plan_growth(cfg, FLAVORS["debug"])] == ["random", "random"]
    with pytest.raises(ConfigError, match=r"growth\.init must be one of \('operator', 'random'\)"):
        load_config(REPO / "train_configs/bench_growth_grown.toml", ["--growth.init=noise"])
