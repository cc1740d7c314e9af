"""Every built-in operator against the properties docs/growth.md promises, on tiny random models."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from growth_testing import TINY, TINY_HD, batch, greedy, grow, random_model

from arbor_titan import registry

TIED = dataclasses.replace(TINY, tie_embeddings=True)
TIED_HD = dataclasses.replace(TINY_HD, tie_embeddings=True)

EXACT = [
    pytest.param("deepen", {"layers": [0, 1, 1]}, TINY, id="deepen-copy"),
    pytest.param("deepen", {"layers": [1], "init": "fresh"}, TINY, id="deepen-fresh"),
    pytest.param("widen_ffn", {"ffn_dim": 96}, TINY, id="widen_ffn-zero"),
    pytest.param("widen_ffn", {"ffn_dim": 80, "mode": "split"}, TINY, id="widen_ffn-split"),
    pytest.param("add_heads", {"kv_heads": 1}, TINY_HD, id="add_heads"),
    pytest.param("clone_width", {}, TINY, id="clone_width"),
    pytest.param("clone_width", {"factor": 3, "ffn_factor": 2}, TIED, id="clone_width-x3-tied"),
    pytest.param("widen_hidden", {"dim": 48}, TINY_HD, id="widen_hidden"),
    pytest.param("widen_hidden", {"dim": 48}, TIED_HD, id="widen_hidden-tied"),
]
# Operators that add entries starting from zero or random (the others only copy and split).
WITH_NEW_ENTRIES = [p for p in EXACT if p.id not in ("widen_ffn-split", "clone_width")]


def logits_diff(op, params, args, dtype):
    model = random_model(args, dtype)
    _, grown = grow(model, op, params)
    x = batch(args.vocab_size)
    with torch.no_grad():
        before, after = model(x), grown(x)
    return float((before - after).abs().max()), float(before.abs().max())


@pytest.mark.parametrize(("op", "params", "args"), EXACT)
def test_logits_unchanged_fp64(op, params, args):
    diff, scale = logits_diff(op, params, args, torch.float64)
    assert scale > 1.0  # logits of a few units, so the bound below means something
    assert diff <= 1e-10
    assert registry.get("growth_operator", op).exact


@pytest.mark.parametrize(("op", "params", "args"), EXACT)
def test_logits_unchanged_fp32(op, params, args):
    diff, scale = logits_diff(op, params, args, torch.float32)
    assert diff <= 2e-5 * max(1.0, scale)


@pytest.mark.parametrize(
    ("op", "params", "args"),
    [
        pytest.param("stack", {"factor": 2}, TINY, id="stack"),
        pytest.param("widen_hidden", {"dim": 48, "rescale_norms": False}, TINY_HD, id="no-rescale"),
    ],
)
def test_negative_controls_move_the_logits(op, params, args):
    diff, scale = logits_diff(op, params, args, torch.float64)
    assert diff > 1e-2 * scale


def test_stack_is_labelled_inexact():
    assert not registry.get("growth_operator", "stack").exact


@pytest.mark.parametrize(("op", "params", "args"), EXACT)
def test_heads_and_rope_unchanged(op, params, args):
    model = random_model(args)
    _, grown = grow(model, op, params)
    new = grown.args
    assert new.head_dim == args.head_dim
    assert new.n_heads % new.n_kv_heads == 0
    (grown_freq, grown_factor), (freq, factor) = grown.rope_frequencies(), model.rope_frequencies()
    assert torch.equal(grown_freq, freq) and grown_factor == factor


@pytest.mark.parametrize(("op", "params", "args"), EXACT)
def test_greedy_generation_identical(op, params, args):
    model = random_model(args)
    _, grown = grow(model, op, params)
    prompt = batch(args.vocab_size, size=2, seq=4, seed=5)
    assert torch.equal(greedy(model, prompt, 32), greedy(grown, prompt, 32))


def partner(name: str) -> str:
    """The residual writer whose gradient moves first when `name`'s new entries can't yet."""
    for readers, writer in (
        (("attention.wq", "attention.wk", "attention.wv", "attention_norm"), "attention.wo"),
        (("feed_forward.w1", "feed_forward.w3", "ffn_norm"), "feed_forward.w2"),
    ):
        for reader in readers:
            if f".{reader}." in name:
                return name.replace(reader, writer)
    return "tok_embeddings.weight" if name in ("output.weight", "norm.weight") else name


def train_loss(model, x):
    return F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, dims=1).flatten())


@pytest.mark.parametrize(("op", "params", "args"), WITH_NEW_ENTRIES)
def test_new_entries_get_gradients_and_train(op, params, args):
    model = random_model(args)
    growth, grown = grow(model, op, params)
    masks = {k: m for name in growth.param_names() for k, m in growth.new_entries(name).items()}
    masks = {k: m for k, m in masks.items() if m.any()}
    assert masks, f"{op} added no new entries"
    params_by_name = dict(grown.named_parameters())
    x = batch(args.vocab_size)

    train_loss(grown, x).backward()
    for name, mask in masks.items():
        writer = partner(name)
        moving = params_by_name[name].grad[mask].ne(0).any()
        writer_moving = params_by_name[writer].grad[masks.get(writer, slice(None))].ne(0).any()
        assert moving or writer_moving, f"{name}: no gradient on its new entries or {writer}'s"

    before = {k: p.detach().clone() for k, p in params_by_name.items()}
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        optimizer.step()
        optimizer.zero_grad()
        train_loss(grown, x).backward()
    for name, mask in masks.items():
        changed = params_by_name[name].detach().ne(before[name])[mask]
        assert changed.all(), f"{name}: {int((~changed).sum())} new entries never moved"


@pytest.mark.parametrize("noise", [True, False], ids=["noise", "no-noise"])
@pytest.mark.parametrize(
    ("op", "params", "name", "rows"),
    [
        ("clone_width", {}, "layers.0.attention.wq.weight", 32),  # 4 heads x 8 per copy
        ("clone_width", {}, "layers.1.feed_forward.w1.weight", 48),
        ("widen_ffn", {"ffn_dim": 96, "mode": "split"}, "layers.0.feed_forward.w1.weight", 48),
    ],
)
def test_noise_breaks_the_copies_symmetry(op, params, name, rows, noise):
    """With noise the copies' first updates differ; without it they stay identical, which is
    why the noise is on by default (the logits are unchanged either way, tested above)."""
    _, grown = grow(random_model(TINY), op, {**params, "noise": noise})
    param = dict(grown.named_parameters())[name]
    before = param.detach().clone()
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.0)
    train_loss(grown, batch(TINY.vocab_size)).backward()
    optimizer.step()
    update = param.detach() - before
    first, second = update[:rows], update[rows : 2 * rows]
    relative = float((first - second).abs().max() / first.abs().max())
    assert relative > 1e-3 if noise else relative < 1e-9
