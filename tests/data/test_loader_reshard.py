"""A loader state saved under one data-parallel layout resumes at the same global position
under another: the next global batch is made of the same sequences."""

import pytest
import torch

from arbor_titan.data import build_dataloader

SEQ_LEN = 7


def window_ids(batch: tuple[torch.Tensor, torch.Tensor]) -> set[int]:
    # Synthetic tokens count 0, 1, 2, ...: a window's first token identifies it.
    return {int(row[0]) // (SEQ_LEN + 1) for row in batch[0]}


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2), (2, 4)])
def test_global_position_carries_over(synthetic_data, old_world, new_world):
    data = synthetic_data(train_tokens=(SEQ_LEN + 1) * 64)
    global_batch, steps = 4, 3
    old = [
        build_dataloader(data, "train", SEQ_LEN, global_batch // old_world, r, old_world, seed=1)
        for r in range(old_world)
    ]
    for loader in old:
        for _ in range(steps):
            next(loader)
    state = old[0].state_dict()
    expected = set().union(*(window_ids(next(loader)) for loader in old))

    new = [
        build_dataloader(data, "train", SEQ_LEN, global_batch // new_world, r, new_world, seed=1)
        for r in range(new_world)
    ]
    for loader in new:
        loader.load_state_dict(state)  # every rank reads rank 0's saved position
    assert set().union(*(window_ids(next(loader)) for loader in new)) == expected
