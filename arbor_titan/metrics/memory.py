"""Memory of this process on its device, for the per-step log line, and a warning near capacity.

On CUDA the caching allocator's counters tell an OOM coming: the peak allocated and reserved
bytes, and `num_alloc_retries` (the allocator had to free its cache and retry a cudaMalloc, a
stall that precedes an OOM under fragmentation). On CPU the process's peak RSS stands in.
"""

import logging
import os
import resource
import sys

import torch

from arbor_titan.metrics.logger import MetricLogger

GIB = 2**30
# A step whose peak comes within 5% of capacity gets a warning event.
NEAR_CAPACITY = 0.95

logger = logging.getLogger("arbor_titan")


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set size.

    The CPU figure is a high-water mark that cannot be reset and includes the interpreter and
    libraries, so it bounds, rather than measures, what training allocated.
    """
    if device.type != "cpu":
        return torch.accelerator.max_memory_allocated(device) / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new accelerator peak (e.g. after the first step's warm-up); a no-op on CPU."""
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def device_capacity_gib(device: torch.device) -> float:
    """What this process may use: the accelerator's memory, or on CPU the machine's RAM shared
    by the node's processes (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    if device.type != "cpu":
        return torch.accelerator.get_memory_info(device)[1] / GIB
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / int(os.environ.get("LOCAL_WORLD_SIZE", 1)) / GIB


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The per-step memory metrics of `device` (peaks since the start or the last reset)."""
    if device.type == "cpu":
        return {"memory_gib": memory_gib(device)}
    stats = torch.accelerator.memory_stats(device)
    return {
        "memory_gib": stats.get("allocated_bytes.all.peak", 0) / GIB,
        "memory_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "ooms": stats.get("num_ooms", 0),
    }


class MemoryWatch:
    """Reads the memory metrics of every logged step and warns, once per run and on the rank
    concerned, when the peak comes within 5% of `capacity_gib`."""

    def __init__(self, device: torch.device, capacity_gib: float, metrics: MetricLogger) -> None:
        self.device = device
        self.capacity_gib = capacity_gib
        self.metrics = metrics
        self.warned = False

    def read(self, step: int) -> dict[str, float]:
        values = memory_metrics(self.device)
        # Reserved memory is what the device has given away, whatever the allocator holds free.
        peak = values.get("memory_reserved_gib", values["memory_gib"])
        values["memory_fraction"] = peak / self.capacity_gib
        if values["memory_fraction"] >= NEAR_CAPACITY and not self.warned:
            self.warned = True
            fields = {"peak_gib": round(peak, 3), "capacity_gib": round(self.capacity_gib, 3)}
            logger.warning(
                "step %d: memory peak %.2f GiB is within %.0f%% of capacity %.2f GiB",
                step,
                peak,
                (1 - NEAR_CAPACITY) * 100,
                self.capacity_gib,
            )
            self.metrics.log_event(step, "memory_near_capacity", fields)
        return values
