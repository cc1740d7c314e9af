"""Peak memory of this process on its device, in GiB, for the per-step log line."""

import resource
import sys

import torch

GIB = 2**30


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
