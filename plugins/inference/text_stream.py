"""Generated token ids → text deltas that never have to be taken back.

Two things can still change at the end of the text: a character whose UTF-8 bytes arrive as
separate byte-fallback tokens (decoded as U+FFFD until complete), and the beginning of a stop
string. Both are held back until the next tokens settle them.
"""

from collections.abc import Sequence
from typing import Protocol

_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Feed tokens one by one; each push returns the text that became final."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; text ends just before it

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (maybe empty)."""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        end = len(full.rstrip(_INCOMPLETE))
        return self._emit(full[: end - self._stop_prefix_len(full[:end])])

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self._tokenizer.decode(self._ids))

    def _emit(self, final: str) -> str:
        delta = final[self._emitted :]
        self._emitted = max(self._emitted, len(final))
        self.text += delta
        return delta

    def _find_stop(self, full: str) -> int | None:
        # Emitted text never ends with the start of a stop string, so one starts after it.
        found = [i for s in self._stop if (i := full.find(s, self._emitted)) >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
