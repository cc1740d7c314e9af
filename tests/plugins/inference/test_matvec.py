"""The decode step's matrix products: oneDNN for large fp32 matrices on CPU, same values."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from plugins.inference import matvec
from plugins.inference.decoder import ArborCachedForward
from tests.plugins.inference.tiny import random_model, tiny_args

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)


def onednn_calls(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3])
def test_large_fp32_matrices_go_through_onednn_with_the_same_values(rows):
    weight = torch.randn(512, 768)  # 1.5 MiB: over the threshold
    x = torch.randn(rows, 1, 768)
    assert weight.nbytes >= matvec.ONEDNN_MIN_BYTES
    assert onednn_calls(lambda: matvec.decode_linear(x, weight)) == 1
    out = matvec.decode_linear(x, weight)
    assert out.shape == (rows, 1, 512)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_small_or_bf16_matrices_stay_with_f_linear():
    small = torch.randn(64, 64)
    large_bf16 = torch.randn(1024, 1024, dtype=torch.bfloat16)
    assert onednn_calls(lambda: matvec.decode_linear(torch.randn(1, 64), small)) == 0
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    assert onednn_calls(lambda: matvec.decode_linear(x, large_bf16)) == 0
    assert torch.equal(matvec.decode_linear(x, large_bf16), F.linear(x, large_bf16))


@needs_onednn
def test_compiled_decode_linear_still_calls_onednn():
    weight, x = torch.randn(512, 768), torch.randn(2, 768)
    compiled = torch.compile(matvec.decode_linear, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)
        assert onednn_calls(lambda: compiled(x, weight)) == 1


@needs_onednn
def test_decode_through_onednn_matches_the_full_forward(monkeypatch):
    """Every decode matrix (the tiny model's are small) forced through oneDNN: same logits."""
    monkeypatch.setattr(matvec, "ONEDNN_MIN_BYTES", 0)
    model = random_model(tiny_args())
    forward = ArborCachedForward(model, slots=2, max_len=24)
    tokens = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator())
    with torch.no_grad():
        forward.prefill(tokens[0, :5], 0)
        forward.prefill(tokens[1, :9], 1)
        positions = torch.tensor([5, 9])
        for _ in range(8):
            logits = forward.decode(tokens[torch.arange(2), positions], positions)
            for slot in range(2):
                expected = model(tokens[slot, : positions[slot] + 1][None])[0, -1]
                assert (logits[slot] - expected).abs().max() < 1e-4
            positions += 1
    layers, matrices_per_layer = model.args.n_layers, 4  # qkv, wo, w1+w3, w2
    calls = onednn_calls(lambda: forward.decode(tokens[:, 0], positions))
    assert calls == layers * matrices_per_layer + 1  # and the output projection
