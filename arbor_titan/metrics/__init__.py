"""Training metrics: console, TensorBoard and JSONL logging; throughput, FLOPs, MFU, memory."""

from arbor_titan.metrics.config import MetricsConfig
from arbor_titan.metrics.console import setup_console_logging
from arbor_titan.metrics.flops import (
    PeakFlops,
    flops_per_token,
    measure_matmul_peak,
    mfu,
    peak_flops,
)
from arbor_titan.metrics.logger import MetricLogger
from arbor_titan.metrics.memory import memory_gib, reset_peak_memory

__all__ = [
    "MetricLogger",
    "MetricsConfig",
    "PeakFlops",
    "flops_per_token",
    "measure_matmul_peak",
    "memory_gib",
    "mfu",
    "peak_flops",
    "reset_peak_memory",
    "setup_console_logging",
]
