import pickle

import numpy as np
import pytest
import torch

from arbor_titan.data import PackedSequences


def first_tokens(dataset: PackedSequences) -> list[int]:
    return [int(dataset[i][0][0]) for i in range(len(dataset))]


def test_windows_are_disjoint_and_labels_are_inputs_shifted():
    tokens = np.arange(1005, dtype=np.uint16)
    dataset = PackedSequences(tokens, seq_len=9, shuffle=False)
    assert len(dataset) == 100  # 1005 // 10; the last 5 tokens are dropped
    for i in range(len(dataset)):
        inputs, labels = dataset[i]
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.tolist() == list(range(10 * i, 10 * i + 9))
        assert labels.tolist() == list(range(10 * i + 1, 10 * i + 10))


def test_epochs_reshuffle_deterministically():
    tokens = np.arange(1000, dtype=np.uint16)
    dataset = PackedSequences(tokens, seq_len=9, seed=3)
    epoch0 = first_tokens(dataset)
    dataset.set_epoch(1)
    epoch1 = first_tokens(dataset)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) == list(range(0, 1000, 10))
    assert first_tokens(PackedSequences(tokens, seq_len=9, seed=3)) == epoch0
    expected = np.random.default_rng(3 + 1).permutation(100) * 10
    assert epoch1 == expected.tolist()


@pytest.mark.parametrize("dp_world", [2, 3])
def test_ranks_read_disjoint_equal_shards(dp_world):
    tokens = np.arange(1000, dtype=np.uint16)  # 100 windows: 3 ranks get 33, one is dropped
    shards = [
        first_tokens(PackedSequences(tokens, 9, rank, dp_world, seed=0)) for rank in range(dp_world)
    ]
    assert {len(s) for s in shards} == {100 // dp_world}
    seen = [t for shard in shards for t in shard]
    assert len(seen) == len(set(seen)) == dp_world * (100 // dp_world)


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="dp_rank 2"):
        PackedSequences(np.arange(100, dtype=np.uint16), 9, dp_rank=2, dp_world=2)


def test_memmap_pickles_by_name(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(50_000, dtype=np.uint16).tofile(path)
    dataset = PackedSequences(np.memmap(path, dtype=np.uint16, mode="r"), seq_len=499)
    payload = pickle.dumps(dataset)
    assert len(payload) < 10_000  # the 100 KB of tokens were not copied
    clone = pickle.loads(payload)
    assert isinstance(clone.tokens, np.memmap)
    assert torch.equal(clone[7][0], dataset[7][0])
