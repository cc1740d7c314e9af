"""Continuous batching bookkeeping: which request holds which KV-cache slot.

Requests wait in arrival order; at every engine step the waiting ones take the free slots, and a
finished request gives its slot back at once, so a new request joins a running batch at the
next step instead of waiting for the whole batch to end.
"""

import threading
from collections import deque
from typing import Generic, TypeVar

R = TypeVar("R")


class SlotScheduler(Generic[R]):
    """A FIFO queue in front of `slots` cache slots. `enqueue` may be called from any thread;
    the rest belongs to the engine's thread."""

    def __init__(self, slots: int):
        self._free = list(range(slots - 1, -1, -1))  # popped lowest first
        self._waiting: deque[R] = deque()
        self._lock = threading.Lock()
        self.running: dict[int, R] = {}

    def enqueue(self, request: R) -> None:
        with self._lock:
            self._waiting.append(request)

    def admit(self) -> list[tuple[int, R]]:
        """Move waiting requests into free slots; return the new (slot, request) pairs."""
        admitted = []
        with self._lock:
            while self._free and self._waiting:
                slot, request = self._free.pop(), self._waiting.popleft()
                self.running[slot] = request
                admitted.append((slot, request))
        return admitted

    def drain(self) -> list[R]:
        """Remove and return every waiting request."""
        with self._lock:
            drained = list(self._waiting)
            self._waiting.clear()
        return drained

    def release(self, slot: int) -> R:
        request = self.running.pop(slot)
        self._free.append(slot)
        self._free.sort(reverse=True)
        return request

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self.running or self._waiting)
