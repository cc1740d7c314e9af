"""Shared data fixtures: a small real tokenizer + token cache, synthetic token files, and the
epoch streams and batches of a loader rebuilt by hand."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from arbor_titan.data import (
    DataConfig,
    LanePosition,
    PreparedData,
    TokenizerConfig,
    prepare_data,
)
from arbor_titan.data.token_cache import TokenCache


class LogLines(list):
    """A `log` callable that keeps the lines for assertions."""

    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture(scope="session")
def stdlib_cfgs() -> tuple[DataConfig, TokenizerConfig]:
    # The first 200 stdlib files (2.7 MB) train a vocab-1000 tokenizer in ~2 s on 2 cores.
    return DataConfig(max_files=200), TokenizerConfig(vocab_size=1000)


@pytest.fixture(scope="session")
def stdlib_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stdlib_cache")


@pytest.fixture(scope="session")
def stdlib_data(stdlib_cfgs, stdlib_cache_dir) -> PreparedData:
    """A tokenizer trained on a slice of the stdlib, and that slice's token cache."""
    return prepare_data(*stdlib_cfgs, stdlib_cache_dir, show_progress=False, log=LogLines())


def synthetic_stream(
    num_tokens: int, bos_id: int, eos_id: int, seed: int
) -> tuple[np.ndarray, int]:
    """Documents of 2 to 60 tokens framed by BOS and EOS, `num_tokens` in all; every other token
    is its file position plus `eos_id + 1` (so it names where it came from). Returns the stream
    and its number of documents."""
    lengths = np.random.default_rng(seed).integers(2, 61, size=num_tokens // 2 + 1)
    ends = np.cumsum(lengths)
    ends = np.append(ends[ends <= num_tokens - 2], num_tokens)  # the last one takes the rest
    starts = np.concatenate([[0], ends[:-1]])
    tokens = np.arange(num_tokens, dtype=np.uint32) + eos_id + 1
    tokens[starts], tokens[ends - 1] = bos_id, eos_id
    return tokens, len(starts)


def documents_in_order(tokens: np.ndarray, bos_id: int, order: np.ndarray) -> np.ndarray:
    """The stream's documents (split at BOS) concatenated in `order`: an epoch built by hand."""
    documents = np.split(tokens, np.flatnonzero(tokens == bos_id)[1:])
    return np.concatenate([documents[i] for i in order]).astype(np.int64)


@pytest.fixture
def synthetic_data(tmp_path, stdlib_data) -> Callable[..., PreparedData]:
    """Make PreparedData of synthetic documents (see `synthetic_stream`), framed by the BOS and
    EOS of a real tokenizer."""
    tokenizer = stdlib_data.tokenizer

    def make(train_tokens: int, val_tokens: int = 1000) -> PreparedData:
        paths, counts, docs = {}, {}, {}
        for seed, (split, n) in enumerate({"train": train_tokens, "val": val_tokens}.items()):
            tokens, docs[split] = synthetic_stream(n, tokenizer.bos_id, tokenizer.eos_id, seed)
            paths[split], counts[split] = tmp_path / f"{split}.bin", n
            tokens.tofile(paths[split])
        cache = TokenCache.of_files(paths, np.dtype(np.uint32), counts, docs, {})
        return PreparedData(tokenizer, cache)

    return make


@pytest.fixture
def epoch_tokens() -> Callable[[PreparedData, str, int], np.ndarray]:
    """`epoch_tokens(data, split, seed + epoch)`: a training epoch's stream built by hand, the
    split's documents in `default_rng(seed + epoch).permutation` order."""

    def build(data: PreparedData, split: str, shuffle_seed: int) -> np.ndarray:
        order = np.random.default_rng(shuffle_seed).permutation(data.cache.num_docs[split])
        return documents_in_order(
            np.asarray(data.cache.tokens(split)), data.tokenizer.bos_id, order
        )

    return build


@pytest.fixture
def log() -> LogLines:
    return LogLines()


def step_tokens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The tokens that one batch of every data-parallel rank (rank order) read, in global order:
    row b of rank r is the step's window b·W + r, and a window is its inputs plus last label."""
    windows = [torch.cat([inputs, labels[:, -1:]], dim=1) for inputs, labels in batches]
    return torch.stack(windows, dim=1).flatten().numpy()


def assert_lanes_tiled(windows: list[tuple[int, int]], position: LanePosition) -> None:
    """The windows read cover exactly each lane's read prefix, no token twice."""
    read = [token for start, stop in windows for token in range(start, stop)]
    assert len(read) == len(set(read)), "a token was read twice"
    starts = [position.lane_start(lane) for lane in range(len(position.offsets))]
    prefixes = {t for start, n in zip(starts, position.offsets) for t in range(start, start + n)}
    assert set(read) == prefixes
