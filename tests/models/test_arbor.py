"""The Arbor model: flavors counted on meta, dims validated, the lifecycle, causality."""

import resource

import pytest
import torch

from arbor_titan.models.arbor import (
    FLAVORS,
    ArborArgs,
    ModelConfig,
    Transformer,
    count_params,
    resolve_args,
)
from arbor_titan.models.arbor.rope import rope_cos_sin, rope_cos_sin_at


def analytic_count(a: ArborArgs) -> int:
    kv_dim = a.n_kv_heads * a.head_dim
    per_layer = 2 * a.dim * a.dim + 2 * a.dim * kv_dim + 3 * a.dim * a.ffn_dim + 2 * a.dim
    output = 0 if a.tie_embeddings else a.vocab_size * a.dim
    return a.n_layers * per_layer + a.dim + a.vocab_size * a.dim + output


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_flavor_counts_on_meta_without_allocating(flavor):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = Transformer(FLAVORS[flavor])
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) == analytic_count(FLAVORS[flavor])
    # A 400B model in fp32 would be 1.8 TB; on meta the process grows by well under 200 MiB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024


def test_named_flavor_sizes():
    counts = {}
    for name, args in FLAVORS.items():
        with torch.device("meta"):
            counts[name] = count_params(Transformer(args))
    assert counts["bench"] == 16_765_824
    assert 790e6 < counts["799m"] < 810e6
    assert 200e9 < counts["200b"] < 220e9
    assert 400e9 < counts["400b"] < 480e9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": 5, "head_dim": 0}, "n_heads=5 must divide dim=128"),
        ({"n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
        ({"dim": 0}, "dim must be positive"),
    ],
)
def test_bad_dims_fail_before_building(change, message):
    args = ArborArgs(**{**FLAVORS["debug"].__dict__, **change})
    with pytest.raises(ValueError, match=message):
        Transformer(args)


def test_unknown_flavor_lists_known():
    with pytest.raises(ValueError, match="known: debug, .*bench, .*400b"):
        resolve_args(ModelConfig(flavor="tiny"))


def tiny_model(tie: bool = False) -> Transformer:
    args = ArborArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        vocab_size=50,
        tie_embeddings=tie,
        max_seq_len=16,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def test_lifecycle_initializes_every_parameter_and_rope():
    model = tiny_model()
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        assert param.abs().sum() > 0, name
    # RoPE is computed per position, equal to the rows of the full table.
    args = model.args
    positions = torch.tensor([0, 5, args.max_seq_len - 1])
    table = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
    assert torch.equal(rope_cos_sin_at(positions, *model.rope_frequencies()), table[:, positions])


def test_tied_output_shares_the_embedding():
    model = tiny_model(tie=True)
    assert model.output is None
    assert count_params(model) == analytic_count(model.args)
    tokens = torch.randint(0, 50, (1, 5))
    logits = model(tokens)
    with torch.no_grad():
        model.tok_embeddings.weight[3] += 1.0
    assert not torch.allclose(model(tokens)[..., 3], logits[..., 3])


def test_causal_future_tokens_do_not_change_the_past():
    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    logits, logits_changed = model(tokens), model(changed)
    torch.testing.assert_close(logits[:, :8], logits_changed[:, :8])
    assert not torch.allclose(logits[:, 8:], logits_changed[:, 8:])
