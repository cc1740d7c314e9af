import pickle

import pytest
import torch

from arbor_titan.data import build_dataloader

SEQ, BATCH = 15, 4  # 800 tokens = 50 windows = 12 batches per epoch


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


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
    resumed = build_dataloader(data, "train", SEQ, BATCH, 0, 1, seed=2, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    assert_same(take(resumed, 8), reference[10:])


def test_training_continues_into_a_reshuffled_epoch(synthetic_data):
    loader = build_dataloader(synthetic_data(800), "train", SEQ, BATCH, 0, 1, seed=0)
    epochs = [torch.cat([x[:, 0] for x, _ in take(loader, 12)]).tolist() for _ in range(2)]
    assert loader.epoch == 1
    assert epochs[0] != epochs[1]
    assert all(len(set(starts)) == 48 for starts in epochs)  # no repeats within an epoch


@pytest.mark.parametrize("dp_world", [2, 3])
def test_ranks_never_read_the_same_sequence(synthetic_data, dp_world):
    data = synthetic_data(3200)  # 200 windows
    seen = []
    for rank in range(dp_world):
        loader = build_dataloader(data, "train", SEQ, BATCH, rank, dp_world, seed=0)
        per_epoch = len(loader.dataset) // BATCH
        seen += [t for x, _ in take(loader, per_epoch) for t in x[:, 0].tolist()]
    assert len(seen) == len(set(seen))


def test_val_batches_are_fixed_and_in_stream_order(synthetic_data):
    loader = build_dataloader(synthetic_data(800, val_tokens=800), "val", SEQ, BATCH, 0, 1, seed=0)
    first = list(loader.val_batches(5))
    assert len(first) == 5
    assert_same(list(loader.val_batches(5)), first)
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts == list(range(0, 20 * (SEQ + 1), SEQ + 1))
    assert len(list(loader.val_batches(100))) == 12  # all there are


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


def test_loader_over_real_tokens(stdlib_data):
    loader = build_dataloader(stdlib_data, "train", 64, 2, 0, 1, seed=0)
    inputs, labels = next(loader)
    bos, eos = stdlib_data.tokenizer.bos_id, stdlib_data.tokenizer.eos_id
    assert int(inputs.max()) < stdlib_data.tokenizer.vocab_size
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    tokens = torch.from_numpy(stdlib_data.cache.tokens("train").astype("int64"))
    assert (
        int((tokens == bos).sum())
        == int((tokens == eos).sum())
        == stdlib_data.cache.num_docs["train"]
    )
