"""A damaged token cache is rebuilt, with a warning naming it: it is only a cache."""

import logging

import numpy as np
import pytest

from arbor_titan.data import DataConfig, TokenizerConfig, prepare_data


@pytest.fixture
def cfgs(tmp_path, stdlib_data) -> tuple[DataConfig, TokenizerConfig]:
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    data_cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], val_fraction=0.3)
    return data_cfg, TokenizerConfig(path=str(stdlib_data.tokenizer.path))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda manifest, shard: manifest.write_text('{"format": 3, "tok'), "unreadable"),
        (lambda manifest, shard: manifest.write_bytes(b"\xff\xfe garbage"), "unreadable"),
        (lambda manifest, shard: manifest.write_text('{"format": 3, "splits": {}}'), "KeyError"),
        (lambda manifest, shard: shard.write_bytes(shard.read_bytes()[:-2]), "manifest.json says"),
        (lambda manifest, shard: shard.unlink(), "is missing"),
    ],
    ids=["truncated-json", "not-utf8", "missing-keys", "short-token-file", "no-token-file"],
)
def test_damaged_cache_is_rebuilt_with_a_warning(cfgs, tmp_path, log, caplog, damage, reason):
    cache_dir = tmp_path / "cache"
    first = prepare_data(*cfgs, cache_dir, show_progress=False, log=log)
    damage(first.cache.root / "manifest.json", first.cache.root / "shard-00000.bin")
    log.clear()
    with caplog.at_level(logging.WARNING, logger="arbor_titan"):
        again = prepare_data(*cfgs, cache_dir, show_progress=False, log=log)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(first.cache.root) in warning and "rebuilding it" in warning and reason in warning
    assert any(line.startswith("tokenized") for line in log)
    assert again.cache == first.cache
    for split in ("train", "val"):
        assert np.array_equal(again.cache.tokens(split), first.cache.tokens(split))
