import dataclasses
import logging
import pickle

import numpy as np
import pytest
import torch

from arbor_titan.data import PreparedData, build_dataloader
from arbor_titan.data.lanes import MIN_LANE_WINDOWS
from tests.data.conftest import assert_lanes_tiled, step_tokens

SEQ, BATCH = 15, 4  # 800 tokens = 3 lanes of 16 windows = 12 batches per epoch


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def rank_loaders(data: PreparedData, seq_len: int, batch: int, dp_world: int, seed: int = 0):
    return [
        build_dataloader(data, "train", seq_len, batch, r, dp_world, seed) for r in range(dp_world)
    ]


def test_batches_are_int64_inputs_and_shifted_labels(synthetic_data):
    loader = build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 0, 1, seed=0)
    inputs, labels = next(iter(loader))
    assert inputs.shape == labels.shape == (BATCH, SEQ)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])


@pytest.mark.parametrize("k", [5, 12, 13, 30])  # mid-epoch, at, just past and two epochs on
def test_resume_yields_exactly_the_next_batches(synthetic_data, k):
    data = synthetic_data(800)
    reference = take(build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=1), k + 8)
    first = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=1)
    take(first, k)
    state = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=1)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 8), reference[k:])


def test_resume_with_a_worker_process(synthetic_data):
    data = synthetic_data(800)
    reference = take(build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=2), 18)
    first = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=2, num_workers=1)
    assert_same(take(first, 10), reference[:10])
    first.set_shape(SEQ, BATCH)  # the shape it has: the worker's prefetched batches stay valid
    assert_same(take(first, 1), reference[10:11])
    resumed = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=2, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    assert_same(take(resumed, 7), reference[11:])


def windows_of(stream: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([stream[start:stop] for start, stop in spans])


def test_each_epoch_reads_its_own_permutation_from_far_apart_lanes(
    synthetic_data, epoch_tokens, caplog
):
    caplog.set_level(logging.INFO, logger="arbor_titan")
    data = synthetic_data(800)
    loader = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=7)
    epochs = []
    for epoch in range(2):
        stream, spans = epoch_tokens(data, "train", 7 + epoch), []
        for _ in range(12):
            read = step_tokens([next(loader)])
            origin = loader.last_origin
            assert origin.epoch == epoch and len(origin.position.offsets) == 3
            assert read.tolist() == windows_of(stream, origin.spans()).tolist()
            # A step's windows come from different lanes, round-robin, not from one place.
            lanes = [start // origin.position.lane_length for start, _ in origin.spans()]
            assert len(set(lanes[:3])) == 3 and lanes[3] == lanes[0]
            spans += origin.spans()
        assert_lanes_tiled(spans, loader.position)  # 3 lanes of 266: 16 windows of 16 each
        assert loader.position.consumed == 12 * BATCH * (SEQ + 1)
        epochs.append(windows_of(stream, spans))
    assert epochs[0].tolist() != epochs[1].tolist()
    next(loader)
    assert loader.last_origin.epoch == 2 and loader.last_origin.position.consumed == 0
    assert "train data: epoch 1 done, 768 of 800 tokens read (4.0% left unread" in caplog.text


def test_as_many_lanes_as_keep_each_16_windows_long(synthetic_data):
    loader = build_dataloader(synthetic_data(200_000), "train", SEQ, BATCH, 0, 1, seed=0)
    next(loader)
    position = loader.last_origin.position
    assert len(position.offsets) == 200_000 // (MIN_LANE_WINDOWS * (SEQ + 1)) == 781


# (steps, seq_len, global batch): the length grows, shrinks, and the global batch changes.
SHAPES = [(3, 63, 12), (2, 127, 6), (4, 95, 6), (3, 95, 12)]


@pytest.mark.parametrize("dp_world", [1, 2, 3])
def test_shape_changes_read_each_lane_once_in_order(synthetic_data, epoch_tokens, dp_world):
    data = synthetic_data(20_000)
    stream = epoch_tokens(data, "train", 3)
    loaders = rank_loaders(data, 31, 12 // dp_world, dp_world, seed=3)
    spans = []
    for steps, seq_len, global_batch in SHAPES:
        for loader in loaders:
            loader.set_shape(seq_len, global_batch // dp_world)
        for _ in range(steps):
            batches = [next(loader) for loader in loaders]
            assert {b[0].shape for b in batches} == {(global_batch // dp_world, seq_len)}
            assert {loader.last_origin for loader in loaders} == {loaders[0].last_origin}
            origin = loaders[0].last_origin
            assert step_tokens(batches).tolist() == windows_of(stream, origin.spans()).tolist()
            spans += origin.spans()
    assert {loader.position for loader in loaders} == {loaders[0].position}
    assert loaders[0].last_origin.epoch == 0
    # The lanes were cut at the first batch's shape, not the one built with: 20,000 // (64 x 16).
    assert len(loaders[0].position.offsets) == 19
    assert_lanes_tiled(spans, loaders[0].position)


def run_schedule(loaders, schedule, first_step: int, last_step: int) -> list:
    """Steps `first_step..last_step - 1` of all ranks, the shape set each step as a trainer's
    schedule would: per step, where it was read from, the tokens read and every rank's batch."""
    taken = []
    for step in range(first_step, last_step):
        seq_len, global_batch = schedule(step)
        for loader in loaders:
            loader.set_shape(seq_len, global_batch // len(loaders))
        batches = [next(loader) for loader in loaders]
        taken.append((loaders[0].last_origin, step_tokens(batches).tolist(), batches))
    return taken


def schedule(step: int) -> tuple[int, int]:
    """Global batch 4 of 15 tokens for 3 steps, then of 23: the epoch's 3 lanes of 266 tokens
    hold 4 windows of 16 each, then 8 of 24 each, so it ends after step 8; step 9 starts the
    next."""
    return (15, 4) if step < 3 else (23, 4)


@pytest.mark.parametrize(("old_world", "new_world"), [(1, 1), (2, 2), (2, 1), (1, 4)])
@pytest.mark.parametrize("k", [2, 5, 9, 10])  # before and after the change, at and past the epoch
def test_resume_across_shape_change_epoch_and_layout(synthetic_data, old_world, new_world, k):
    data = synthetic_data(800)
    old = rank_loaders(data, 15, 4 // old_world, old_world, seed=4)
    reference = run_schedule(old, schedule, 0, 16)
    assert (reference[8][0].epoch, reference[9][0].epoch) == (0, 1)
    assert reference[9][0].position.consumed == 0

    first = rank_loaders(data, 15, 4 // old_world, old_world, seed=4)
    run_schedule(first, schedule, 0, k)
    state = pickle.loads(pickle.dumps(first[0].state_dict()))
    # A fresh run at the start shape: the state restores the position and, on the same layout,
    # the shape; the schedule then sets the shape of step k as it would anyway.
    resumed = rank_loaders(data, 15, 4 // new_world, new_world, seed=4)
    for loader in resumed:
        loader.load_state_dict(state)
        assert (loader.epoch, loader.position, loader.seq_len) == (
            first[0].epoch,
            first[0].position,
            state["seq_len"],
        )
    after = run_schedule(resumed, schedule, k, k + 6)
    for (origin, tokens, batches), (ref_origin, ref_tokens, ref_batches) in zip(
        after, reference[k : k + 6], strict=True
    ):
        assert origin == ref_origin and tokens == ref_tokens
        if new_world == old_world:
            for batch, ref_batch in zip(batches, ref_batches):
                assert_same([batch], [ref_batch])


def test_load_restores_the_shape_on_the_same_layout_and_keeps_the_batch_on_another(synthetic_data):
    data = synthetic_data(800)
    saved = build_dataloader(data, "train", SEQ, 2, 0, 2, seed=0)
    saved.set_shape(23, 1)
    next(saved)
    state, position = saved.state_dict(), saved.position
    same = build_dataloader(data, "train", SEQ, 2, 0, 2, seed=0)
    same.load_state_dict(state)
    assert (same.seq_len, same.batch_size, same.position) == (23, 1, position)
    assert_same(take(same, 3), take(saved, 3))  # no set_shape needed on the same layout
    other = build_dataloader(data, "train", SEQ, 3, 0, 1, seed=0)
    other.load_state_dict(state)
    assert (other.seq_len, other.batch_size, other.position) == (23, 3, position)


@pytest.mark.parametrize(
    "old",
    [
        {"epoch": 0, "loader": {}, "start": 0, "global_consumed": 8, "dp_world": 1,
         "batch_size": 4},  # fixed windows
        {"epoch": 0, "cursor": 64, "seq_len": 15, "dp_world": 1, "batch_size": 4},  # one cursor
    ],
)  # fmt: skip
def test_an_older_loader_state_is_refused_with_what_to_do(synthetic_data, old):
    loader = build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 0, 1, seed=0)
    with pytest.raises(ValueError, match="lacks split_tokens, lane_length.*initial_load_path"):
        loader.load_state_dict(old)


def test_a_position_in_other_data_is_refused(synthetic_data):
    saved = build_dataloader(synthetic_data(2000), "train", SEQ, BATCH, 0, 1, seed=0)
    take(saved, 20)
    state = saved.state_dict()
    del saved  # the files are rewritten next, smaller
    smaller = build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"train split of 2,000 tokens, this one has 800"):
        smaller.load_state_dict(state)


def test_val_batches_are_fixed_and_in_file_order(synthetic_data):
    data = synthetic_data(800, val_tokens=800)
    loader = build_dataloader(data, "val", SEQ, BATCH, 0, 1, seed=0)
    first = list(loader.val_batches(5))
    assert len(first) == 5
    assert_same(list(loader.val_batches(5)), first)
    file_tokens = np.asarray(data.cache.tokens("val")).tolist()
    assert np.concatenate([step_tokens([b]) for b in first]).tolist() == file_tokens[: 5 * 64]
    assert len(list(loader.val_batches(100))) == 12  # all there are
    longer = list(loader.val_batches(100, seq_len=31))
    assert len(longer) == 6 and longer[0][0].shape == (BATCH, 31)
    assert np.concatenate([step_tokens([b]) for b in longer]).tolist() == file_tokens[:768]
    assert loader.seq_len == SEQ  # validation at another length leaves the loader's shape alone


def test_val_batches_shard_the_file_order_over_ranks(synthetic_data):
    data = synthetic_data(800, val_tokens=800)
    loaders = [build_dataloader(data, "val", SEQ, 2, r, 2, seed=0) for r in range(2)]
    batches = zip(*(loader.val_batches(3) for loader in loaders))
    read = np.concatenate([step_tokens(list(step)) for step in batches])
    assert read.tolist() == np.asarray(data.cache.tokens("val"))[: 3 * 64].tolist()


def test_val_batches_refuses_a_training_loader(synthetic_data):
    loader = build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 0, 1, seed=0)
    with pytest.raises(ValueError, match="needs a 'val' loader"):
        loader.val_batches(1)


def test_too_little_data_names_the_sizes(synthetic_data):
    data = synthetic_data(800, val_tokens=50)
    with pytest.raises(ValueError, match=r"val split has 50 tokens.*batch_size=4.*seq_len=15"):
        build_dataloader(data, "val", SEQ, BATCH, 0, 1, seed=0)
    with pytest.raises(ValueError, match="smaller training.seq_len"):
        build_dataloader(data, "train", 255, BATCH, 0, 1, seed=0)
    loader = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"800 tokens.*batch_size=2.*seq_len=511.*shorter seq_len"):
        loader.set_shape(511, 2)
    with pytest.raises(ValueError, match="must be >= 1, got 0, 2"):
        loader.set_shape(0, 2)
    assert (loader.seq_len, loader.batch_size) == (SEQ, BATCH)
    val = build_dataloader(data, "val", 11, 1, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"seq_len=63.*validate at a shorter seq_len"):
        val.val_batches(1, seq_len=63)


def test_rank_outside_world_is_an_error(synthetic_data):
    with pytest.raises(ValueError, match="dp_rank 2"):
        build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 2, 2, seed=0)


def test_a_cache_whose_documents_disagree_with_its_manifest_is_refused(synthetic_data):
    data = synthetic_data(800)
    cache = dataclasses.replace(data.cache, num_docs={**data.cache.num_docs, "train": 3})
    with pytest.raises(RuntimeError, match=r"holds \d+ train documents, its manifest says 3"):
        build_dataloader(PreparedData(data.tokenizer, cache), "train", SEQ, BATCH, 0, 1, seed=0)


def test_loader_over_real_tokens(stdlib_data, epoch_tokens):
    loader = build_dataloader(stdlib_data, "train", 64, 2, 0, 1, seed=0)
    stream = epoch_tokens(stdlib_data, "train", 0)
    for _ in range(3):
        inputs, labels = next(loader)
        assert int(inputs.max()) < stdlib_data.tokenizer.vocab_size
        expected = windows_of(stream, loader.last_origin.spans())
        assert step_tokens([(inputs, labels)]).tolist() == expected.tolist()
    tokens = np.asarray(stdlib_data.cache.tokens("train"))
    bos, eos = stdlib_data.tokenizer.bos_id, stdlib_data.tokenizer.eos_id
    assert (tokens == bos).sum() == (tokens == eos).sum() == stdlib_data.cache.num_docs["train"]
