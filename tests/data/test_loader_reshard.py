"""A loader state saved under one data-parallel layout resumes at the same global position
under another: the next global batch is made of the same tokens, each rank keeping the
micro-batch size of its own layout."""

import pytest

from arbor_titan.data import build_dataloader
from tests.data.conftest import step_tokens

SEQ_LEN = 7


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2), (2, 4)])
def test_global_position_carries_over(synthetic_data, old_world, new_world):
    data = synthetic_data(train_tokens=(SEQ_LEN + 1) * 64)
    global_batch, steps = 4, 3

    def loaders(world: int) -> list:
        return [
            build_dataloader(data, "train", SEQ_LEN, global_batch // world, r, world, seed=1)
            for r in range(world)
        ]

    old = loaders(old_world)
    for _ in range(steps):
        for loader in old:
            next(loader)
    state = old[0].state_dict()
    expected = step_tokens([next(loader) for loader in old])

    new = loaders(new_world)
    for loader in new:
        loader.load_state_dict(state)  # every rank reads rank 0's saved position
    assert step_tokens([next(loader) for loader in new]).tolist() == expected.tolist()
    assert new[0].last_origin == old[0].last_origin
