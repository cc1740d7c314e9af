"""Weighted mixtures ([[data.sources]]): token shares, provenance, exact resume on any layout and
shape, per-source validation, and the config and checkpoint around them."""

import itertools

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from arbor_titan.data import DataConfig, TokenizerConfig, build_dataloader, prepare_data
from arbor_titan.data.config import SourceConfig, check_data_config
from arbor_titan.data.dataset import Documents
from arbor_titan.data.mixture import MixtureLoader, choose_sources
from tests.data.conftest import step_tokens, synthetic_stream

BOS, EOS = 1, 2
WEIGHTS = {"web": 0.5, "code": 0.3, "books": 0.2}
# Sizes far apart: the small source goes through many epochs while the large one is in its first.
SIZES = {"web": 40_000, "code": 9_000, "books": 3_000}
# Source s's ordinary tokens are `position + 3 + s * OFFSET`: a token names its source.
OFFSET = 1_000_000

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def source_documents() -> dict[str, tuple[float, Documents]]:
    sources = {}
    for index, (name, weight) in enumerate(WEIGHTS.items()):
        tokens, _ = synthetic_stream(SIZES[name], BOS, EOS, seed=index)
        tokens[tokens > EOS] += index * OFFSET
        sources[name] = (weight, Documents(tokens, BOS))
    return sources


def loader(dp_rank: int = 0, dp_world: int = 1, batch: int = 4, seq_len: int = 15, split="train"):
    return MixtureLoader(source_documents(), split, seq_len, batch, dp_rank, dp_world, seed=7)


def source_of(tokens: np.ndarray) -> np.ndarray:
    """Each ordinary token's source index (BOS/EOS dropped)."""
    return tokens[tokens > EOS] // OFFSET


def test_choices_follow_the_weights_one_window_at_a_time():
    tokens = [0, 0, 0]
    chosen = choose_sources([0.5, 0.3, 0.2], tokens, 10, window=4)
    # Window 3 goes to the third source: 0.2 · 12 - 0 = 2.4 above the first's 0.5 · 12 - 4 = 2.
    assert chosen == [0, 1, 2, 0, 0, 1, 0, 2, 1, 0]
    assert tokens == [20, 12, 8]
    for end in range(1, len(chosen) + 1):  # every prefix within one window of each share
        counts = np.bincount(chosen[:end], minlength=3)
        assert all(abs(c - w * end) < 1 for c, w in zip(counts, [0.5, 0.3, 0.2]))
    # In two calls, the same sequence: batch boundaries don't matter.
    again = [0, 0, 0]
    assert (
        choose_sources([0.5, 0.3, 0.2], again, 3, 4) + choose_sources([0.5, 0.3, 0.2], again, 7, 4)
        == chosen
    )


def test_three_sources_token_shares_within_one_percent_over_1000_steps():
    mixture = loader()
    read = np.concatenate([step_tokens([batch]) for batch in itertools.islice(mixture, 1000)])
    counts = mixture.token_counts()
    total = sum(counts.values())
    assert total == 1000 * 4 * 16
    sources = np.bincount(source_of(read), minlength=3)
    for index, (name, weight) in enumerate(WEIGHTS.items()):
        assert abs(counts[name] / total - weight) < 0.01, name
        # The tokens themselves, not only the counter: ordinary tokens by where they came from.
        assert abs(sources[index] / sources.sum() - weight) < 0.01, name
    assert all(source.epoch >= 1 for source in mixture.sources[1:])  # the small ones rolled over


def test_layout_free_the_global_windows_are_the_same_on_one_or_two_ranks():
    one = loader(batch=4)
    two = [loader(rank, 2, batch=2) for rank in range(2)]
    for _ in range(60):
        single = step_tokens([next(one)])
        assert np.array_equal(single, step_tokens([next(rank) for rank in two]))


def test_exact_resume_on_another_layout_and_after_a_shape_change():
    reference = loader()
    for _ in range(37):
        next(reference)
    reference.set_shape(31, 2)
    for _ in range(20):
        next(reference)
    state = reference.state_dict()
    expected = [step_tokens([next(reference)]) for _ in range(50)]
    resumed = [loader(rank, 2, batch=1) for rank in range(2)]
    for rank in resumed:
        rank.load_state_dict(state)
    assert (resumed[0].seq_len, resumed[0].batch_size) == (31, 1)  # per-rank batch: its own
    got = [step_tokens([next(rank) for rank in resumed]) for _ in range(50)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert resumed[0].token_counts() == reference.token_counts()


def test_state_survives_a_dcp_round_trip(tmp_path):
    saved = loader()
    for _ in range(300):
        next(saved)
    dcp.save({"dataloader": saved}, checkpoint_id=str(tmp_path), no_dist=True)
    keys = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    restored = loader()
    restored.check_state_keys(k.removeprefix("dataloader.") for k in keys)
    dcp.load({"dataloader": restored}, checkpoint_id=str(tmp_path), no_dist=True)
    assert restored.state_dict() == saved.state_dict()
    assert torch.equal(next(restored)[0], next(saved)[0])


def test_a_state_of_other_sources_is_refused():
    state = loader().state_dict()
    with pytest.raises(ValueError, match="lacks sources.web.epoch.*data.sources"):
        loader().check_state_keys(["seq_len", "batch_size", "dp_world", "epoch"])
    other = MixtureLoader(
        dict(itertools.islice(source_documents().items(), 2)), "train", 15, 4, 0, 1, 7
    )
    with pytest.raises(ValueError, match=r"sources \['web', 'code', 'books'\], data.sources"):
        other.load_state_dict(state)


def test_validation_per_source_and_mixed():
    val = loader(split="val")
    books = list(val.val_batches(3, source="books"))
    assert len(books) == 3
    assert set(source_of(step_tokens(books))) == {2}
    mixed = step_tokens(list(val.val_batches(5)))
    assert set(source_of(mixed)) == {0, 1, 2}
    assert np.array_equal(mixed, step_tokens(list(val.val_batches(5))))  # the same every call
    with pytest.raises(ValueError, match="no source 'news'"):
        next(val.val_batches(1, source="news"))


def test_a_source_too_small_for_a_batch_is_named():
    with pytest.raises(ValueError, match="data source 'books' has 3,000 tokens"):
        loader(batch=200)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"paths": ["x.txt"]}, "data.paths describe a single source"),
        ({"num_workers": 2}, "data.num_workers > 0 is not supported"),
    ],
)
def test_mixture_config_refuses_single_source_keys(kwargs, message):
    cfg = DataConfig(sources=[SourceConfig(name="a", weight=1.0)], **kwargs)
    with pytest.raises(ValueError, match=message):
        check_data_config(cfg)


def test_mixture_config_names_bad_sources():
    twins = [SourceConfig(name="a", weight=1.0), SourceConfig(name="a", weight=2.0)]
    with pytest.raises(ValueError, match="distinct, non-empty name"):
        check_data_config(DataConfig(sources=twins))
    bad = [SourceConfig(name="web", weight=1.0, source="parquet")]
    with pytest.raises(ValueError, match=r"data.sources\['web'\]: data.paths must name files"):
        check_data_config(DataConfig(sources=bad))
    chat = [SourceConfig(name="chat", weight=1.0, source="chat", paths=["a.jsonl"])]
    with pytest.raises(ValueError, match="source = 'chat' is not supported in a mixture"):
        check_data_config(DataConfig(sources=chat))


def test_prepare_and_load_a_mixture_of_real_files(tmp_path, stdlib_data, log):
    (tmp_path / "a.txt").write_text("def a():\n    return 1\n" * 200)
    (tmp_path / "b.jsonl").write_text('{"text": "import os\\nprint(os.sep)\\n"}\n' * 300)
    cfg = DataConfig(
        val_fraction=0.0,
        sources=[
            SourceConfig(name="text", weight=3.0, source="text", paths=[str(tmp_path / "a.txt")]),
            SourceConfig(
                name="json", weight=1.0, source="jsonl", paths=[str(tmp_path / "*.jsonl")]
            ),
        ],
    )
    tokenizer = TokenizerConfig(path=str(stdlib_data.tokenizer.path))
    data = prepare_data(cfg, tokenizer, tmp_path / "cache", show_progress=False, log=log)
    assert data.cache is None
    assert {name: s.weight for name, s in data.mixture.items()} == {"text": 0.75, "json": 0.25}
    assert any(line.startswith("data source 'json': train") for line in log)
    train = build_dataloader(data, "train", 31, 4, 0, 1, seed=0)
    assert isinstance(train, MixtureLoader)
    for _ in range(25):
        next(train)
    assert train.token_counts() == {"text": 75 * 32, "json": 25 * 32}
