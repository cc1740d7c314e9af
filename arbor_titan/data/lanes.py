"""Where a training epoch's reading stands: its stream cut into lanes, each read from its start.

One step's windows must not be neighbours in the stream (consecutive windows of shuffled
documents are mostly one document, and such batches learn less per step), yet a change of
window length or batch must re-pack exactly where reading stopped. So the epoch's stream is cut
into K equal lanes, fixed for the epoch; global window m (counted from this position on) comes
from lane `(next_lane + m) mod K`, at that lane's next unread token. Each lane is consumed as a
prefix, so the position is K offsets and a lane pointer, the same on every layout and for every
window length.

Lane k is not the k-th stretch of the stream but stretch `k · stride mod K`, the stride near
K / golden ratio and prime to K: consecutive lanes then lie far apart (a long document spans
neighbouring stretches), and any run of consecutive lanes spreads evenly over the stream.
"""

import math
from dataclasses import dataclass
from functools import cache

# Lanes per epoch, at most: bounds the position's size (a checkpoint holds one offset a lane).
MAX_LANES = 4096
# Each lane holds at least this many windows of the epoch's first shape (and a whole step): as
# many lanes as that allows, so that consecutive steps read far-apart places for as long as can
# be; a lane's tail shorter than a window is what an epoch leaves unread.
MIN_LANE_WINDOWS = 16


@dataclass(frozen=True)
class LanePosition:
    """Lane k is stream tokens `[k·lane_length, (k+1)·lane_length)`, of which the first
    `offsets[k]` are read; the next window comes from lane `next_lane`."""

    lane_length: int
    offsets: tuple[int, ...]
    next_lane: int = 0

    @classmethod
    def start(cls, stream_tokens: int, window: int, windows_per_step: int) -> "LanePosition":
        """An epoch's start: as many lanes (up to MAX_LANES) as keep each one at least
        `max(MIN_LANE_WINDOWS, windows_per_step)` windows long, so a step always fits."""
        per_lane = window * max(MIN_LANE_WINDOWS, windows_per_step)
        lanes = max(1, min(MAX_LANES, stream_tokens // per_lane))
        return cls(stream_tokens // lanes, (0,) * lanes)

    def lane_start(self, lane: int) -> int:
        """Where lane `lane` starts in the stream."""
        return _stretch(lane, len(self.offsets)) * self.lane_length

    @property
    def consumed(self) -> int:
        """Tokens read in this epoch, over all lanes."""
        return sum(self.offsets)

    def window_start(self, m: int, window: int) -> int:
        """Where in the stream window m (from this position on) starts."""
        lanes = len(self.offsets)
        lane = (self.next_lane + m) % lanes
        return self.lane_start(lane) + self.offsets[lane] + (m // lanes) * window

    def windows_left(self, window: int) -> int:
        """How many windows, from this position on, fit before one would overrun its lane."""
        lanes = len(self.offsets)
        # Lane k serves windows m ≡ k - next_lane (mod K); the first it can't serve ends the run.
        return min(
            (lane - self.next_lane) % lanes + ((self.lane_length - offset) // window) * lanes
            for lane, offset in enumerate(self.offsets)
        )

    def advanced(self, windows: int, window: int) -> "LanePosition":
        """The position after `windows` windows of `window` tokens were read."""
        lanes = len(self.offsets)
        offsets = list(self.offsets)
        for step in range(min(lanes, windows)):
            served = windows // lanes + (1 if step < windows % lanes else 0)
            offsets[(self.next_lane + step) % lanes] += served * window
        return LanePosition(self.lane_length, tuple(offsets), (self.next_lane + windows) % lanes)


def _stretch(lane: int, lanes: int) -> int:
    return lane * _stride(lanes) % lanes


@cache
def _stride(lanes: int) -> int:
    stride = max(1, round(lanes / (1 + math.sqrt(5)) * 2))
    while math.gcd(stride, lanes) != 1:
        stride += 1
    return stride
