"""The steps since the last logged one: the time inside them, their tokens and model FLOPs."""

import time
from dataclasses import dataclass

import torch

from arbor_titan.distributed.device import synchronize


@dataclass
class ThroughputWindow:
    """Accumulates train steps between two logged ones; only the time inside each step counts,
    so validation and checkpoint callbacks don't dilute tokens/s.

    An accelerator runs a step's kernels after the host has queued them, so the clock read when
    a step returns can come before its work is done. `stop(..., synchronize_device=True)` waits
    for the device first; the logged steps need it, as their window must hold all its work.
    """

    device: torch.device
    seconds: float = 0.0
    tokens: int = 0
    flops: int = 0
    _started: float = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, tokens: int, flops_per_token: int, synchronize_device: bool) -> None:
        if synchronize_device:
            synchronize(self.device)
        self.seconds += time.perf_counter() - self._started
        self.tokens += tokens
        self.flops += tokens * flops_per_token

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def flops_per_token(self) -> float:
        """The window's mean: steps of different lengths have different attention FLOPs."""
        return self.flops / self.tokens

    def reset(self) -> None:
        self.seconds, self.tokens, self.flops = 0.0, 0, 0
