"""Runs that heal themselves: skip non-finite updates, replay out-of-memory steps at lower memory,
dump stacks on a hang, resume on restart."""

from arbor_titan.health.nonfinite import NonFiniteError, NonFiniteGuard
from arbor_titan.health.oom import OomFallback, OutOfMemoryStop
from arbor_titan.health.restart import log_restart_notice
from arbor_titan.health.watchdog import HangWatchdog

__all__ = [
    "HangWatchdog",
    "NonFiniteError",
    "NonFiniteGuard",
    "OomFallback",
    "OutOfMemoryStop",
    "log_restart_notice",
]
