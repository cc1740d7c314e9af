"""Continuous batching bookkeeping: which request holds which KV-cache slot.

Requests wait in arrival order; at every engine step the waiting ones take the free slots, and a
finished request gives its slot back at once, so a new request joins a running batch at the
next step instead of waiting for the whole batch to end.
"""

import threading
from collections import deque
from collections.abc import Callable
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

    def admit_next(self, place: Callable[[int, R], bool]) -> tuple[int, R] | None:
        """Move the first waiting request into a free slot if `place(slot, request)` finds it
        room (the KV memory); return the new (slot, request) pair, or None. One at a time, so a
        request is prefilled (and its prompt's blocks shared) before the next is placed."""
        with self._lock:
            if not (self._free and self._waiting and place(self._free[-1], self._waiting[0])):
                return None
            slot, request = self._free.pop(), self._waiting.popleft()
            self.running[slot] = request
        return slot, request

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
