"""A one-line progress display on stderr, without a dependency."""

import sys
import time


class Progress:
    """Rewrites one stderr line: documents done, text read and its MB/s, tokens written, and the
    time left, from the share of the `total_chars` characters still to do; silent when disabled.

    Work done before this process started (`add_done`, a resumed preparation) counts towards
    the totals but not towards the rate.
    """

    def __init__(
        self, label: str, total_docs: int, total_chars: int, enabled: bool, every_s: float = 1.0
    ):
        self.label, self.enabled, self.every_s = label, enabled, every_s
        self.total_docs, self.total_chars = total_docs, total_chars
        self.docs = self.chars = self.tokens = 0
        self._chars_before = 0
        self._nbytes = 0  # read by this process
        self._start = self._last = time.perf_counter()

    def add_done(self, docs: int, chars: int, tokens: int) -> None:
        """Count work an earlier, interrupted process did."""
        self._count(docs, chars, tokens)
        self._chars_before += chars

    def update(self, docs: int, chars: int, nbytes: int, tokens: int) -> None:
        self._count(docs, chars, tokens)
        self._nbytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._show(now)

    def _count(self, docs: int, chars: int, tokens: int) -> None:
        self.docs, self.chars, self.tokens = (
            self.docs + docs,
            self.chars + chars,
            self.tokens + tokens,
        )

    def close(self) -> None:
        self._show(time.perf_counter(), end="\n")

    def _show(self, now: float, end: str = "") -> None:
        if not self.enabled:
            return
        elapsed = max(now - self._start, 1e-9)
        line = (
            f"\r{self.label}: {self.docs:,}/{self.total_docs:,} documents, "
            f"{self._nbytes / 1e6:,.1f} MB at {self._nbytes / 1e6 / elapsed:.1f} MB/s, "
            f"{self.tokens:,} tokens, {self._time_left(elapsed)}"
        )
        print(line, end=end, file=sys.stderr, flush=True)

    def _time_left(self, elapsed: float) -> str:
        if self.chars >= self.total_chars:
            return f"done in {_clock(elapsed)}"
        chars_now = self.chars - self._chars_before
        if not chars_now:
            return "ETA unknown"
        return f"ETA {_clock(elapsed * (self.total_chars - self.chars) / chars_now)}"


def _clock(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
