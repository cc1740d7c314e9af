"""The KV-cache forward equals the model's own cache-free forward, step by step and per slot."""

import pytest
import torch

from arbor_titan.models.arbor.rope import rope_cos_sin
from plugins.inference.decoder import ArborCachedForward
from plugins.inference.rope import rope_table
from tests.plugins.inference.tiny import prefill, random_model, tiny_args

TOL = 1e-4  # fp32; measured differences are ~1e-6
ONE = torch.tensor([0])  # slot 0 alone


def reference_logits(model, tokens_s):
    with torch.no_grad():
        return model(tokens_s[None])[0, -1]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"n_kv_heads": 4},
        {"n_kv_heads": 1, "tie_embeddings": True},
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}},
    ],
    ids=["gqa", "mha", "mqa-tied", "yarn"],
)
def test_prefill_then_decode_matches_full_forward_at_every_step(changes):
    model = random_model(tiny_args(**changes))
    forward = ArborCachedForward(model, slots=1, max_len=40)
    tokens = torch.randint(
        0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        logits = prefill(forward, tokens[:7], slot=0)
        assert (logits - reference_logits(model, tokens[:7])).abs().max() < TOL
        for pos in range(7, 40):
            logits = forward.decode(ONE, tokens[pos : pos + 1], torch.tensor([pos]))[0]
            assert (logits - reference_logits(model, tokens[: pos + 1])).abs().max() < TOL, pos


def test_slots_at_different_positions_decode_independently(tiny_model):
    """Three sequences of different lengths share one decode call; each sees only its own keys."""
    forward = ArborCachedForward(tiny_model, slots=3, max_len=32)
    tokens = torch.randint(
        0, tiny_model.args.vocab_size, (3, 32), generator=torch.Generator().manual_seed(2)
    )
    lengths = torch.tensor([3, 11, 1])
    with torch.no_grad():
        for slot, length in enumerate(lengths.tolist()):
            prefill(forward, tokens[slot, :length], slot)
        for _ in range(12):
            logits = forward.decode(torch.arange(3), tokens[torch.arange(3), lengths], lengths)
            for slot in range(3):
                expected = reference_logits(tiny_model, tokens[slot, : lengths[slot] + 1])
                assert (logits[slot] - expected).abs().max() < TOL
            lengths += 1


def test_attending_over_the_used_prefix_of_the_cache_gives_the_same_logits(tiny_model):
    forward = ArborCachedForward(tiny_model, slots=2, max_len=64)
    tokens = torch.randint(0, tiny_model.args.vocab_size, (2, 20), generator=torch.Generator())
    with torch.no_grad():
        prefill(forward, tokens[0, :9], 0)
        prefill(forward, tokens[1, :4], 1)
        positions = torch.tensor([9, 4])
        for keys_len in (10, 16, None):  # just enough, rounded up, the whole cache
            logits = forward.decode(torch.arange(2), tokens[:, 10], positions, keys_len)
            for slot in range(2):
                expected = reference_logits(
                    tiny_model, torch.cat([tokens[slot, : positions[slot]], tokens[slot, 10:11]])
                )
                assert (logits[slot] - expected).abs().max() < TOL


def test_fused_projections_share_storage_with_the_model(tiny_model):
    """q/k/v and w1/w3 are multiplied as one matrix each; the model's weights are its rows."""
    forward = ArborCachedForward(tiny_model, slots=1, max_len=8)
    for block, fused in zip(tiny_model.layers.values(), forward.fused, strict=True):
        attn, ffn = block.attention, block.feed_forward
        qkv, w13 = fused.qkv.weight, fused.w13.weight
        rows = [attn.wq.weight, attn.wk.weight, attn.wv.weight]
        assert torch.equal(qkv, torch.cat(rows))
        assert all(w.untyped_storage().data_ptr() == qkv.data_ptr() for w in rows)
        w1_bytes = w13[0].nbytes * len(ffn.w1.weight)
        assert ffn.w3.weight.data_ptr() == w13.data_ptr() + w1_bytes


def test_a_reused_slot_forgets_its_previous_sequence(tiny_model):
    forward = ArborCachedForward(tiny_model, slots=1, max_len=16)
    long, short = torch.arange(10, 22), torch.arange(30, 33)
    with torch.no_grad():
        prefill(forward, long, 0)
        forward.release(0)
        prefill(forward, short, 0)
        logits = forward.decode(ONE, torch.tensor([40]), torch.tensor([3]))[0]
    expected = reference_logits(tiny_model, torch.tensor([30, 31, 32, 40]))
    assert (logits - expected).abs().max() < TOL


def test_rope_table_extends_past_the_training_length():
    args = tiny_args(max_seq_len=16)
    table = rope_table(args, 100)
    assert table.shape == (2, 100, args.head_dim)
    assert torch.equal(table[:, :16], rope_cos_sin(args.head_dim, 16, args.rope_theta))
    model = random_model(args)
    forward = ArborCachedForward(model, slots=1, max_len=100)
    with torch.no_grad():
        prefill(forward, torch.arange(1, 60), 0)
        logits = forward.decode(ONE, torch.tensor([5]), torch.tensor([59]))
    assert torch.isfinite(logits).all()


def test_cache_holds_kv_heads_only(tiny_model):
    """GQA: the cache stores n_kv_heads (2), not n_heads (4): half the bytes of full heads. By
    default the pool has a static cache's room: a 16-position block per slot here."""
    forward = ArborCachedForward(tiny_model, slots=3, max_len=16)
    keys, values = forward.cache.layer(0)
    assert keys.shape == values.shape == (3, 16, 2, 16)  # blocks, positions, kv heads, head_dim
    assert forward.cache.nbytes == 2 * 2 * 3 * 2 * 16 * 16 * 4  # layers, k+v, blocks, ..., fp32
