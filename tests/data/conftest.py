"""Shared data fixtures: a small real tokenizer + token cache, and synthetic token files."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from arbor_titan.data import DataConfig, PreparedData, TokenizerConfig, prepare_data
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


@pytest.fixture
def synthetic_data(tmp_path) -> Callable[..., PreparedData]:
    """Make PreparedData whose token streams are 0, 1, 2, ...: a window's first token names it."""

    def make(train_tokens: int, val_tokens: int = 1000) -> PreparedData:
        counts = {"train": train_tokens, "val": val_tokens}
        paths = {split: tmp_path / f"{split}.bin" for split in counts}
        for split, n in counts.items():
            np.arange(n, dtype=np.uint16).tofile(paths[split])
        cache = TokenCache(paths, np.dtype(np.uint16), counts, {"train": 1, "val": 1}, {})
        return PreparedData(tokenizer=None, cache=cache)  # loaders never use the tokenizer

    return make


@pytest.fixture
def log() -> LogLines:
    return LogLines()
