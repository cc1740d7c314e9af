"""FLOPs per token by hand, GPU peak table lookups, and the cached CPU matmul probe."""

import json

import pytest
import torch

from arbor_titan.metrics import PeakFlops, flops, flops_per_token, mfu, peak_flops


def test_flops_per_token_matches_hand_computation():
    # 6·(N - embedding) + 12·L·H·Q·T = 6·800 + 12·2·4·8·16
    assert flops_per_token(1000, 200, n_layers=2, n_heads=4, head_dim=8, seq_len=16) == 17088


def test_mfu_is_a_fraction_of_peak():
    assert mfu(1000.0, 1_000_000, PeakFlops(1e10, "test")) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("name", "bf16"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
    ],
)
def test_known_gpus_come_from_the_table(monkeypatch, name, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak.flops == bf16
    assert peak.source.endswith("table, bf16 dense")


def test_fp32_on_gpu_counts_tf32_only_when_enabled(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    matmul = torch.backends.cuda.matmul
    original = matmul.fp32_precision  # a computed attribute: monkeypatch cannot restore it
    try:
        matmul.fp32_precision = "ieee"
        assert peak_flops(torch.device("cuda"), torch.float32).flops == 67e12
        matmul.fp32_precision = "tf32"
        peak = peak_flops(torch.device("cuda"), torch.float32)
        assert (peak.flops, peak.source) == (494.7e12, "NVIDIA H100 SXM table, tf32 dense")
    finally:
        matmul.fp32_precision = original


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """Cache under tmp_path; the probe returns 1.5e11 FLOP/s and records its calls."""
    monkeypatch.setenv("ARBOR_TITAN_CACHE", str(tmp_path))
    calls = []

    def measure(dtype, size, device):
        calls.append((dtype, size, device.type))
        return 1.5e11

    monkeypatch.setattr(flops, "measure_matmul_peak", measure)
    return calls


def test_cpu_peak_is_probed_once_then_read_from_the_cache(fake_probe, tmp_path):
    first = peak_flops(torch.device("cpu"), torch.bfloat16)
    second = peak_flops(torch.device("cpu"), torch.bfloat16)
    assert fake_probe == [(torch.bfloat16, 2048, "cpu")]
    assert first.flops == second.flops == 1.5e11
    assert first.source.startswith("CPU matmul probe (bf16, 2048x2048, cached in ")
    assert "read from" in second.source
    (key,) = json.loads((tmp_path / "peak_flops.json").read_text())
    assert f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key


def test_cache_is_keyed_by_dtype_and_thread_count(fake_probe, monkeypatch):
    peak_flops(torch.device("cpu"), torch.float32)
    peak_flops(torch.device("cpu"), torch.bfloat16)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    peak_flops(torch.device("cpu"), torch.bfloat16)
    assert len(fake_probe) == 3


def test_damaged_cache_is_remeasured(fake_probe, tmp_path):
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert peak_flops(torch.device("cpu"), torch.float32).flops == 1.5e11
    assert len(fake_probe) == 1


def test_unknown_gpu_falls_back_to_a_probe(fake_probe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    peak = peak_flops(torch.device("cuda"), torch.float16)
    assert peak.source.startswith("CUDA matmul probe (fp16, 8192x8192")
    assert fake_probe == [(torch.float16, 8192, "cuda")]


def test_unsupported_dtype_is_an_error():
    with pytest.raises(ValueError, match="float64"):
        peak_flops(torch.device("cpu"), torch.float64)


def test_real_probe_measures_a_plausible_rate():
    rate = flops.measure_matmul_peak(torch.float32, size=256)
    assert 1e8 < rate < 1e14
