"""Model FLOPs per token, the device's peak FLOP/s, and their ratio: model FLOPs utilization.

Known GPUs use vendor datasheet peaks. Anything else (CPUs, unlisted GPUs) is measured with a
short matmul probe, cached as JSON in `$ARBOR_TITAN_CACHE` (default `~/.cache/arbor_titan/`)
so every run on a machine divides by the same number.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PeakFlops:
    """A device's peak FLOP/s for one dtype, with where the figure came from."""

    flops: float
    source: str


@dataclass(frozen=True)
class GpuPeak:
    label: str
    bf16: float  # dense tensor-core peaks, i.e. without 2:4 sparsity
    tf32: float
    fp32: float  # non-tensor-core, when TF32 matmuls are off


# First match wins: every listed substring must occur in torch.cuda.get_device_name().
# Figures from NVIDIA datasheets; their headline tensor peaks assume 2:4 sparsity, twice these.
GPU_PEAKS: tuple[tuple[tuple[str, ...], GpuPeak], ...] = (
    (("A100",), GpuPeak("NVIDIA A100", 312e12, 156e12, 19.5e12)),
    (("H100", "PCIe"), GpuPeak("NVIDIA H100 PCIe", 756e12, 378e12, 51e12)),
    (("H100", "HBM3"), GpuPeak("NVIDIA H100 SXM", 989.4e12, 494.7e12, 67e12)),
    (("H200", "NVL"), GpuPeak("NVIDIA H200 NVL", 835.5e12, 417.5e12, 60e12)),
    (("H200",), GpuPeak("NVIDIA H200 SXM", 989.4e12, 494.7e12, 67e12)),
    (("B200",), GpuPeak("NVIDIA B200", 2.25e15, 1.125e15, 75e12)),  # HGX B200 sheet / 8
    (("L40S",), GpuPeak("NVIDIA L40S", 362.05e12, 183e12, 91.6e12)),
    # NVIDIA publishes no separate A10G sheet; these are the A10's (same GA102 board class).
    (("A10G",), GpuPeak("NVIDIA A10G", 125e12, 62.5e12, 31.2e12)),
    # GeForce figures with FP32 accumulation (what training uses), from the Ada whitepaper.
    (("RTX 4090",), GpuPeak("NVIDIA RTX 4090", 165.2e12, 82.6e12, 82.6e12)),
)

_CPU_PROBE_SIZE = 2048  # big enough to be compute-bound on a CPU, small enough for ~1 s
_GPU_PROBE_SIZE = 8192  # smaller GPU matmuls do not fill the SMs
_PROBE_REPEATS = 5
_PROBE_REPEAT_SECONDS = 0.2
_CPU = torch.device("cpu")


def flops_per_token(
    num_params: int,
    num_embedding_params: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    seq_len: int,
) -> int:
    """Training FLOPs per token, forward + backward, as in PaLM (Chowdhery et al. 2022, app. B).

    6 per non-embedding parameter (2 forward, 4 backward) plus 12·L·H·Q·T for the attention
    score and value matmuls. The input embedding is a lookup, not a matmul, so the caller passes
    its size as `num_embedding_params`; an untied output projection stays counted in the 6·N.
    """
    dense = 6 * (num_params - num_embedding_params)
    attention = 12 * n_layers * n_heads * head_dim * seq_len
    return dense + attention


def mfu(tokens_per_second: float, flops_per_token: int, peak: PeakFlops) -> float:
    """Model FLOPs utilization, a fraction in [0, 1]: achieved over peak FLOP/s of one device.

    `tokens_per_second` must be this device's throughput (global throughput / world size).
    """
    return tokens_per_second * flops_per_token / peak.flops


def peak_flops(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    """The peak FLOP/s of `device` for matmuls in `dtype` (bf16/fp16 or fp32).

    On CUDA, fp32 counts as TF32 when torch runs fp32 matmuls on TF32 tensor cores.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"no peak FLOP/s for {dtype}; use bfloat16, float16 or float32")
    if device.type == "cuda":
        name = _device_name(device)
        for needles, gpu in GPU_PEAKS:
            if all(n in name for n in needles):
                return _table_peak(gpu, dtype)
    return _probed_peak(device, dtype)


def _table_peak(gpu: GpuPeak, dtype: torch.dtype) -> PeakFlops:
    if dtype != torch.float32:
        return PeakFlops(gpu.bf16, f"{gpu.label} table, {_short(dtype)} dense")
    if torch.backends.cuda.matmul.fp32_precision == "tf32":
        return PeakFlops(gpu.tf32, f"{gpu.label} table, tf32 dense")
    return PeakFlops(gpu.fp32, f"{gpu.label} table, fp32")


def measure_matmul_peak(
    dtype: torch.dtype, size: int = _CPU_PROBE_SIZE, device: torch.device = _CPU
) -> float:
    """FLOP/s of `torch.mm` on size×size operands: the best of a few ~0.2 s timed runs.

    The best run, not the mean, because other processes only ever slow the probe down.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty_like(a)

    def timed(calls: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _synchronize(device)
        return time.perf_counter() - start

    timed(2)  # warm-up: thread pools, kernel selection, caches
    calls = max(1, round(_PROBE_REPEAT_SECONDS / timed(1)))
    best = min(timed(calls) for _ in range(_PROBE_REPEATS))
    return 2 * size**3 * calls / best


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":  # accelerator kernels run asynchronously
        torch.accelerator.synchronize(device)


def cache_dir() -> Path:
    """Where arbor_titan caches per-machine measurements."""
    return Path(os.environ.get("ARBOR_TITAN_CACHE", Path.home() / ".cache" / "arbor_titan"))


def _probed_peak(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    size = _CPU_PROBE_SIZE if device.type == "cpu" else _GPU_PROBE_SIZE
    path = cache_dir() / "peak_flops.json"
    key = " | ".join(
        (
            _device_name(device),
            f"torch {torch.__version__}",
            f"{torch.get_num_threads()} threads",
            str(dtype),
            f"{size}x{size}",
        )
    )
    cache = _read_json(path)
    what = f"{device.type.upper()} matmul probe ({_short(dtype)}, {size}x{size}"
    if key in cache:
        return PeakFlops(cache[key], f"{what}, read from {path})")
    cache[key] = measure_matmul_peak(dtype, size, device)
    _write_json_atomically(path, cache)
    return PeakFlops(cache[key], f"{what}, cached in {path})")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        return models[0] if models else "unknown cpu"
    return device.type


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # a missing or damaged cache only costs a re-measurement


def _write_json_atomically(path: Path, data: dict) -> None:
    """Ranks sharing a machine may write at once; a rename is atomic, so no reader sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
