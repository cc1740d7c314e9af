"""Optimizer state through growth: moments follow the gradient, new entries start at zero, and
`step` is per tensor (0 for tensors made only of new entries, kept otherwise)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from growth_testing import TINY, TINY_HD, batch, grow, random_model
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from arbor_titan.growth import Growth

TIED = dataclasses.replace(TINY, tie_embeddings=True)
LR, BETAS = 1e-3, (0.9, 0.95)

# Noise off: with it, cloned and split entries' gradients differ from the old ones on purpose.
CASES = [
    pytest.param("deepen", {"layers": [0, 1]}, TINY, id="deepen"),
    pytest.param("widen_ffn", {"ffn_dim": 96}, TINY, id="widen_ffn-zero"),
    pytest.param("widen_ffn", {"ffn_dim": 80, "mode": "split", "noise": False}, TINY, id="split"),
    pytest.param("add_heads", {"kv_heads": 1}, TINY_HD, id="add_heads"),
    pytest.param("clone_width", {"noise": False}, TINY, id="clone_width"),
    pytest.param(
        "clone_width", {"factor": 3, "ffn_factor": 2, "noise": False}, TIED, id="clone-x3"
    ),
    pytest.param("widen_hidden", {"dim": 48}, TINY_HD, id="widen_hidden"),
]


def loss_of(model, x):
    return F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, dims=1).flatten())


def grads(model, x):
    model.zero_grad()
    loss_of(model, x).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("op", "params", "args"), CASES)
def test_moments_follow_the_gradient(op, params, args):
    """The moment rule holds exactly where it claims to: grown exp_avg (exp_avg_sq) of the old
    gradient (squared) equals the grown model's gradient (squared) on every carried entry, and
    is zero on every new entry."""
    model = random_model(args)
    growth, grown = grow(model, op, params)
    x = batch(args.vocab_size)
    old, new = grads(model, x), grads(grown, x)
    checked = 0
    for name in growth.param_names():
        first = growth.grow_moment(name, "exp_avg", old[name])
        second = growth.grow_moment(name, "exp_avg_sq", old[name] ** 2)
        for new_name, is_new in growth.new_entries(name).items():
            carried = ~is_new
            scale = new[new_name].abs().max()
            torch.testing.assert_close(
                first[new_name][carried], new[new_name][carried], rtol=0, atol=1e-10 * scale
            )
            torch.testing.assert_close(
                second[new_name][carried],
                new[new_name][carried] ** 2,
                rtol=0,
                atol=1e-10 * scale**2,
            )
            assert not first[new_name][is_new].any() and not second[new_name][is_new].any()
            checked += int(carried.sum())
    assert checked > 0


def trained(args, steps: int = 2):
    model = random_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    x = batch(args.vocab_size)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model, x).backward()
        optimizer.step()
    return model, optimizer


def test_old_moments_land_in_old_slices_and_new_ones_are_zero():
    model, optimizer = trained(TINY)
    state = get_optimizer_state_dict(model, optimizer)
    grown = Growth.create("widen_ffn", TINY, {"ffn_dim": 96}).optimizer_state(state)
    w2 = "layers.1.feed_forward.w2.weight"
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(grown["state"][w2][key][:, :48], state["state"][w2][key])
        assert not grown["state"][w2][key][:, 48:].any()
    assert grown["state"][w2]["step"] == state["state"][w2]["step"] == 2

    deepened = Growth.create("deepen", TINY, {"layers": [0]}).optimizer_state(state)
    moved, copy = "layers.2.attention.wq.weight", "layers.1.attention.wq.weight"
    source = state["state"]["layers.1.attention.wq.weight"]
    assert torch.equal(deepened["state"][moved]["exp_avg"], source["exp_avg"])
    assert deepened["state"][moved]["step"] == 2
    assert not deepened["state"][copy]["exp_avg"].any() and deepened["state"][copy]["step"] == 0
    # New names join their source's param group, right after it.
    names = deepened["param_groups"][0]["params"]
    assert names.index(copy) == names.index("layers.0.attention.wq.weight") + 1


def median_first_update(op: str, params: dict, source: str, name: str) -> float:
    """|first AdamW update| / lr over the new entries of `name` (grown from `source`), right after
    growing a model whose optimizer has run 1000 steps (bias corrections ~1)."""
    model, optimizer = trained(TINY)
    state = get_optimizer_state_dict(model, optimizer)
    for entry in state["state"].values():
        entry["step"].fill_(1000)
    growth = Growth.create(op, TINY, params)
    grown = random_model(growth.new_args)  # weights replaced below
    grown.load_state_dict(growth.model_state(model.state_dict()))
    new_optimizer = torch.optim.AdamW(grown.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    set_optimizer_state_dict(grown, new_optimizer, growth.optimizer_state(state))
    param = dict(grown.named_parameters())[name]
    before = param.detach().clone()
    loss_of(grown, batch(TINY.vocab_size)).backward()
    new_optimizer.step()
    mask = growth.new_entries(source)[name]
    return float(((param.detach() - before)[mask].abs() / LR).median())


def test_new_entries_of_a_kept_step_take_the_documented_small_first_step():
    # Step kept (1000), moments zero: m = (1-b1) g, v = (1-b2) g^2, update lr (1-b1)/sqrt(1-b2).
    w2 = "layers.0.feed_forward.w2.weight"
    ratio = median_first_update("widen_ffn", {"ffn_dim": 96}, w2, w2)
    expected = (1 - BETAS[0]) / (1 - BETAS[1]) ** 0.5  # 0.447 at b2 = 0.95
    assert ratio == pytest.approx(expected, rel=0.01)


def test_wholly_new_tensors_restart_bias_correction():
    # Step 0 -> 1: bias correction makes the first update lr * g/|g|, as for a fresh model.
    source, copy = "layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"
    ratio = median_first_update("deepen", {"layers": [0]}, source, copy)
    assert ratio == pytest.approx(1.0, rel=0.01)


def test_unknown_optimizer_entry_is_named():
    growth = Growth.create("deepen", TINY, {"layers": [0]})
    with pytest.raises(ValueError, match=r"norm.weight.momentum_buffer: unknown entry"):
        growth.grow_state_entry("norm.weight", "momentum_buffer", torch.zeros(32))


def test_clone_then_step_versus_step_then_clone():
    """Clone's moment rule, checked end to end (docs/growth.md, "Optimizer state"). With moments
    scaled as the gradients are, tensors the clone does not divide (embedding, gains) step exactly
    as if the small model had stepped and then been cloned; a tensor divided by n takes n times that
    step, because Adam's update ignores the gradient's scale (documented in clone_width)."""
    model, optimizer = trained(TINY, steps=3)
    growth, grown = grow(model, "clone_width", {"noise": False})
    grown_optimizer = torch.optim.AdamW(grown.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    set_optimizer_state_dict(
        grown, grown_optimizer, growth.optimizer_state(get_optimizer_state_dict(model, optimizer))
    )
    x = batch(TINY.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown_before = {k: v.clone() for k, v in grown.state_dict().items()}
    for m, opt in ((model, optimizer), (grown, grown_optimizer)):
        opt.zero_grad()
        loss_of(m, x).backward()
        opt.step()
    for name, after in model.state_dict().items():
        step_then_clone = (
            growth.grow_param(name, after)[name] - growth.grow_param(name, before[name])[name]
        )
        clone_then_step = grown.state_dict()[name] - grown_before[name]
        divided = not (name == "tok_embeddings.weight" or name.endswith("norm.weight"))
        # Adam's eps does not scale with the moments: equal to 1e-3, not to rounding.
        torch.testing.assert_close(
            clone_then_step, step_then_clone * (2 if divided else 1), rtol=1e-3, atol=1e-3 * LR
        )
