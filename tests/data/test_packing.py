import pickle

import numpy as np
import pytest
import torch

from arbor_titan.data import Documents, EpochStream, LanePosition, PackedSequences
from tests.data.conftest import documents_in_order, synthetic_stream

BOS, EOS = 1, 2


def stream(num_tokens: int, seed: int = 0) -> tuple[np.ndarray, Documents]:
    tokens, _ = synthetic_stream(num_tokens, BOS, EOS, seed)
    return tokens, Documents(tokens, BOS)


def test_documents_start_at_each_bos():
    tokens, documents = stream(1000)
    bos_positions = np.flatnonzero(tokens == BOS)
    assert len(documents) == len(bos_positions) > 10
    assert documents.starts.tolist() == [*bos_positions.tolist(), 1000]
    assert documents.num_tokens == 1000


def test_a_stream_that_does_not_start_with_bos_is_refused():
    tokens, _ = stream(100)
    with pytest.raises(ValueError, match=r"must start with BOS \(1\), this one starts with 4"):
        Documents(tokens[1:], BOS)


def test_documents_are_found_across_scan_chunks(monkeypatch):
    monkeypatch.setattr("arbor_titan.data.dataset._SCAN_TOKENS", 7)
    tokens, documents = stream(1000)
    assert documents.starts.tolist() == [*np.flatnonzero(tokens == BOS).tolist(), 1000]


def test_reads_equal_the_documents_concatenated_in_order():
    tokens, documents = stream(2000, seed=1)
    order = np.random.default_rng(5).permutation(len(documents))
    expected = documents_in_order(tokens, BOS, order)
    epoch = EpochStream(documents, order)
    assert len(epoch) == 2000
    rng = np.random.default_rng(0)
    for start, length in [(0, 2000), (0, 0), (1999, 1), *rng.integers(0, 1000, (50, 2))]:
        got = epoch.read(int(start), int(length))
        assert got.dtype == np.int64
        assert got.tolist() == expected[start : start + length].tolist()
    with pytest.raises(IndexError, match=r"\[1990, 2001\) are outside the stream of 2000"):
        epoch.read(1990, 11)


def test_windows_follow_the_lanes_and_labels_are_inputs_shifted():
    tokens, documents = stream(1005)
    epoch = EpochStream(documents, np.arange(len(documents)))
    # Two lanes of 502 tokens, 3 read in lane 0 and 53 in lane 1; lane 1 goes first.
    position = LanePosition(502, (3, 53), next_lane=1)
    windows = PackedSequences(epoch, position, seq_len=9)
    assert len(windows) == 88  # lane 1 holds 44 more windows (lane 0 49): 44 rounds of 2
    starts = [502 + 53, 3, 502 + 63, 13, 502 + 73]
    for i, start in enumerate(starts):
        inputs, labels = windows[i]
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.tolist() == tokens[start : start + 9].tolist()
        assert labels.tolist() == tokens[start + 1 : start + 10].tolist()
    with pytest.raises(IndexError):
        windows[88]


@pytest.mark.parametrize("dp_world", [2, 3])
def test_ranks_interleave_the_windows_in_equal_shares(dp_world):
    _, documents = stream(1000)  # 100 windows in 1 lane: 3 ranks get 33, the last one is dropped
    epoch = EpochStream(documents, np.random.default_rng(0).permutation(len(documents)))
    one_lane = LanePosition(1000, (0,))
    shards = [PackedSequences(epoch, one_lane, 9, rank, dp_world) for rank in range(dp_world)]
    assert {len(shard) for shard in shards} == {100 // dp_world}
    # Item i of every rank, rank by rank, are the global windows i·W .. i·W + W - 1.
    interleaved = [shard[i][0][0] for i in range(100 // dp_world) for shard in shards]
    expected = [epoch.read(10 * w, 1)[0] for w in range(dp_world * (100 // dp_world))]
    assert torch.stack(interleaved).tolist() == expected


def test_memmap_pickles_by_name(tmp_path):
    path = tmp_path / "tokens.bin"
    synthetic_stream(50_000, BOS, EOS, seed=0)[0].tofile(path)
    documents = Documents(np.memmap(path, dtype=np.uint32, mode="r"), BOS)
    whole = LanePosition(documents.num_tokens, (0,))
    windows = PackedSequences(EpochStream(documents, np.arange(len(documents))), whole, 499)
    payload = pickle.dumps(windows)
    # The 200 KB of tokens were not copied; the per-document offsets (~1,600 documents) were.
    assert len(payload) < 50_000
    clone = pickle.loads(payload)
    assert isinstance(clone.stream.documents.tokens, np.memmap)
    assert torch.equal(clone[7][0], windows[7][0])
