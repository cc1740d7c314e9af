"""A one-line progress display on stderr, without a dependency."""

import sys
import time


class Progress:
    """Rewrites one stderr line with `done/total` documents and MB/s; silent when disabled."""

    def __init__(self, label: str, total: int, enabled: bool, every_s: float = 0.25):
        self.label, self.total, self.enabled, self.every_s = label, total, enabled, every_s
        self.done = 0
        self.nbytes = 0
        self._start = self._last = time.perf_counter()

    def update(self, docs: int, nbytes: int) -> None:
        self.done += docs
        self.nbytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._show(now)

    def close(self) -> None:
        self._show(time.perf_counter(), end="\n")

    def _show(self, now: float, end: str = "") -> None:
        if not self.enabled:
            return
        rate = self.nbytes / 1e6 / max(now - self._start, 1e-9)
        line = f"\r{self.label}: {self.done}/{self.total} documents, {rate:.1f} MB/s"
        print(line, end=end, file=sys.stderr, flush=True)
