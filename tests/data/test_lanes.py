import numpy as np
import pytest

from arbor_titan.data.lanes import MAX_LANES, MIN_LANE_WINDOWS, LanePosition


def first_overrun(position: LanePosition, window: int) -> int:
    """The first window (from `position`) that would cross its lane's end, by walking."""
    m = 0
    while True:
        lane = (position.next_lane + m) % len(position.offsets)
        lane_stop = position.lane_start(lane) + position.lane_length
        if position.window_start(m, window) + window > lane_stop:
            return m
        m += 1


def random_positions(count: int):
    rng = np.random.default_rng(0)
    for _ in range(count):
        lanes, length = int(rng.integers(1, 8)), int(rng.integers(1, 60))
        offsets = tuple(int(o) for o in rng.integers(0, length + 1, lanes))
        yield LanePosition(length, offsets, int(rng.integers(lanes))), int(rng.integers(1, 10))


def test_windows_left_is_where_the_first_window_would_overrun_its_lane():
    for position, window in random_positions(300):
        assert position.windows_left(window) == first_overrun(position, window)


def test_advancing_continues_the_same_windows():
    for position, window in random_positions(300):
        n = position.windows_left(window)
        later = position.advanced(n, window)
        assert later.consumed == position.consumed + n * window
        assert later.windows_left(window) == 0
        for taken in range(n):
            step = position.advanced(taken, window)
            assert step.window_start(0, window) == position.window_start(taken, window)


def test_consecutive_windows_come_from_consecutive_lanes():
    position = LanePosition(100, (0, 10, 20), next_lane=2)
    # Lanes 0, 1, 2 are the stream's stretches 0, 2, 1 (stride 2).
    assert [position.window_start(m, 5) for m in range(5)] == [120, 0, 210, 125, 5]


@pytest.mark.parametrize("lanes", [1, 2, 10, 97, 2425, MAX_LANES])
def test_lanes_are_a_permutation_of_the_stretches_with_neighbours_far_apart(lanes):
    position = LanePosition(1, (0,) * lanes)
    stretches = [position.lane_start(lane) for lane in range(lanes)]
    assert sorted(stretches) == list(range(lanes))
    if lanes >= 10:
        gaps = [abs(a - b) for a, b in zip(stretches, stretches[1:])]
        assert min(gaps) >= lanes // 4
        # Any 8 consecutive lanes (a step's windows) spread over the stream: no two within a
        # twentieth of it (8 random stretches would be, more often than not).
        for first in range(lanes - 8):
            run = sorted(stretches[first : first + 8])
            assert min(b - a for a, b in zip(run, run[1:])) >= lanes // 20


@pytest.mark.parametrize(
    ("tokens", "window", "per_step", "lanes"),
    [
        (10**9, 4097, 8, MAX_LANES),  # capped
        (100 * 16 * 64, 64, 8, 100),  # each lane MIN_LANE_WINDOWS windows long
        (100 * 16 * 64, 64, 32, 50),  # ... and a whole step long
        (1000, 64, 8, 1),  # too small to split: one lane
    ],
)
def test_an_epoch_starts_with_lanes_a_step_always_fits_in(tokens, window, per_step, lanes):
    position = LanePosition.start(tokens, window, per_step)
    assert len(position.offsets) == lanes and position.lane_length == tokens // lanes
    if lanes > 1:
        assert position.lane_length >= window * max(MIN_LANE_WINDOWS, per_step)
        assert position.windows_left(window) >= per_step
