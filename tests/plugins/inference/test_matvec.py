"""The decode step's matrix products: oneDNN for large matrices on CPU (fp32 as they are,
bf16 packed into oneDNN's layout) except a compiled single row, the same values as `F.linear`,
compiled or not."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from plugins.inference import matvec
from plugins.inference.decoder import ArborCachedForward
from plugins.inference.matvec import DecodeMatrix
from tests.plugins.inference.tiny import prefill, random_model, tiny_args

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


def test_small_matrices_stay_with_f_linear():
    small, x = torch.randn(64, 64), torch.randn(1, 64)
    assert onednn_calls(lambda: matvec.decode_linear(x, small)) == 0
    matrix = DecodeMatrix(small.bfloat16())
    assert matrix.packed is None
    assert torch.equal(
        matrix(x.bfloat16(), decoding=True), F.linear(x.bfloat16(), small.bfloat16())
    )


@needs_onednn
def test_large_bf16_matrices_decode_from_a_packed_copy_unless_told_not_to():
    weight, x = torch.randn(512, 768, dtype=torch.bfloat16), torch.randn(2, 1, 768).bfloat16()
    packed, plain = DecodeMatrix(weight), DecodeMatrix(weight, pack=False)
    assert packed.packed is not None and packed.packed.is_mkldnn and plain.packed is None
    expected = F.linear(x.float(), weight.float())
    for matrix in (packed, plain):
        assert matrix(x, decoding=True).shape == (2, 1, 512)
        torch.testing.assert_close(matrix(x, decoding=True).float(), expected, rtol=2e-2, atol=0.3)
    # Prefill (many rows) always multiplies the row-major weight.
    assert torch.equal(packed(x, decoding=False), F.linear(x, weight))


def test_compiled_single_row_decode_is_a_fused_reduction_with_f_linear_values():
    """Batch 1 compiled: inductor's own reduction, no library call (see matvec.py); bf16 here,
    fp32 in test_engine's compiled-equals-eager test (one compile each: they cost seconds)."""
    weight, x = torch.randn(512, 768).bfloat16(), torch.randn(1, 1, 768).bfloat16()
    compiled = torch.compile(DecodeMatrix(weight), fullgraph=True)
    with torch.no_grad():
        out = compiled(x, True)
        assert out.shape == (1, 1, 512) and out.dtype == torch.bfloat16
        expected = F.linear(x.float(), weight.float())
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=0.3)
        assert onednn_calls(lambda: compiled(x, True)) == 0


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_of_several_rows_still_calls_onednn(dtype):
    matrix, x = DecodeMatrix(torch.randn(512, 768, dtype=dtype)), torch.randn(2, 768, dtype=dtype)
    compiled = torch.compile(matrix, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, True), matrix(x, True), rtol=1e-5, atol=1e-4)
        assert onednn_calls(lambda: compiled(x, True)) == 1


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_through_onednn_matches_the_full_forward(monkeypatch, dtype):
    """Every decode matrix (the tiny model's are small) forced through oneDNN: same logits as
    the model's own forward, within the dtype's rounding."""
    monkeypatch.setattr(matvec, "ONEDNN_MIN_BYTES", 0)
    model = random_model(tiny_args()).to(dtype)
    forward = ArborCachedForward(model, slots=2, max_len=24)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16: logits ~8, measured 0.03
    tokens = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator())
    with torch.no_grad():
        prefill(forward, tokens[0, :5], 0)
        prefill(forward, tokens[1, :9], 1)
        positions = torch.tensor([5, 9])
        for _ in range(8):
            logits = forward.decode(torch.arange(2), tokens[torch.arange(2), positions], positions)
            for slot in range(2):
                expected = model(tokens[slot, : positions[slot] + 1][None])[0, -1].float()
                assert (logits[slot] - expected).abs().max() < tolerance
            positions += 1
    layers, matrices_per_layer = model.args.n_layers, 4  # qkv, wo, w1+w3, w2
    calls = onednn_calls(lambda: forward.decode(torch.arange(2), tokens[:, 0], positions))
    assert calls == layers * matrices_per_layer + 1  # and the output projection
