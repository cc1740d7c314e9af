"""The sharded token cache: a killed preparation resumes where it stopped, any number of workers
writes the same files, and the loader reads shards exactly as it read one file per split."""

import json
import logging
import pickle

import numpy as np
import pytest

from arbor_titan.data import (
    Corpus,
    DataConfig,
    PreparedData,
    TokenizerConfig,
    build_dataloader,
    prepare,
    shards,
)
from arbor_titan.data.cache import cache_key, file_sha1
from arbor_titan.data.token_cache import TokenCache, build_token_cache
from arbor_titan.data.token_stream import Piece, TokenStream

# 40 stdlib files (0.9M characters) cut into shards of 60K characters: 12 shards.
SHARD_CHARS = 60_000


class Killed(Exception):
    """Stands for the preparation's process being killed."""


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(DataConfig(max_files=40, val_fraction=0.2))


@pytest.fixture(scope="module")
def uninterrupted(stdlib_data, corpus, tmp_path_factory) -> TokenCache:
    """The corpus' cache built in one go, by one worker."""
    cache_dir = tmp_path_factory.mktemp("uninterrupted")
    return build(stdlib_data.tokenizer, corpus, cache_dir, log=lambda line: None)


def build(tokenizer, corpus, cache_dir, log, workers=1, shard_chars=SHARD_CHARS):
    return build_token_cache(tokenizer, corpus, cache_dir, False, log, workers, shard_chars)


def streams(cache) -> dict[str, np.ndarray]:
    return {split: np.asarray(cache.tokens(split)) for split in ("train", "val")}


def assert_same_tokens(cache, reference) -> None:
    assert (cache.num_tokens, cache.num_docs) == (reference.num_tokens, reference.num_docs)
    for split, tokens in streams(cache).items():
        assert np.array_equal(tokens, streams(reference)[split]), split


def test_a_killed_preparation_resumes_at_its_first_unfinished_shard(
    stdlib_data, corpus, uninterrupted, tmp_path, log, monkeypatch
):
    tokenizer = stdlib_data.tokenizer
    shard_count = len(json.loads((uninterrupted.root / "manifest.json").read_text())["shards"])
    assert shard_count >= 8

    encode, encoded = shards.encode_shard, []

    def killed_at_shard_5(tok, job):
        if job.index == 5:
            raise Killed
        encoded.append(job.index)
        return encode(tok, job)

    monkeypatch.setattr(shards, "encode_shard", killed_at_shard_5)
    with pytest.raises(Killed):
        build(tokenizer, corpus, tmp_path / "cache", log)
    root = next((tmp_path / "cache").iterdir())
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(manifest["shards"]) == 5 and manifest["splits"] is None
    assert not [f for f in root.iterdir() if f.name.startswith(".")]  # no temporary file left

    def counted(tok, job):
        encoded.append(job.index)
        return encode(tok, job)

    encoded.clear()
    monkeypatch.setattr(shards, "encode_shard", counted)
    log.clear()
    resumed = build(tokenizer, corpus, tmp_path / "cache", log)
    assert encoded == list(range(5, shard_count))  # the 5 finished shards are not redone
    assert any(line.startswith(f"resuming the token cache {root} at shard 5") for line in log)
    assert_same_tokens(resumed, uninterrupted)


def test_a_damaged_shard_of_an_unfinished_preparation_is_tokenized_again(
    stdlib_data, corpus, uninterrupted, tmp_path, log, monkeypatch, caplog
):
    tokenizer = stdlib_data.tokenizer
    encode = shards.encode_shard

    def killed_at_shard_4(tok, job):
        if job.index == 4:
            raise Killed
        return encode(tok, job)

    monkeypatch.setattr(shards, "encode_shard", killed_at_shard_4)
    with pytest.raises(Killed):
        build(tokenizer, corpus, tmp_path / "cache", log)
    monkeypatch.setattr(shards, "encode_shard", encode)
    root = next((tmp_path / "cache").iterdir())
    (root / "shard-00002.bin").write_bytes(b"\0\0")
    log.clear()
    with caplog.at_level(logging.WARNING, logger="arbor_titan"):
        resumed = build(tokenizer, corpus, tmp_path / "cache", log)
    assert any("shard 2 is damaged" in r.getMessage() for r in caplog.records)
    assert any(f"{root} at shard 2" in line for line in log)
    assert_same_tokens(resumed, uninterrupted)


def test_two_workers_write_what_one_writes(stdlib_data, corpus, uninterrupted, tmp_path, log):
    serial = uninterrupted
    parallel = build(stdlib_data.tokenizer, corpus, tmp_path, log, workers=2)
    assert any("with 2 workers" in line for line in log)
    manifests = [json.loads((c.root / "manifest.json").read_text()) for c in (serial, parallel)]
    assert manifests[0] == manifests[1]
    for shard in sorted(serial.root.glob("shard-*.bin")):
        assert shard.read_bytes() == (parallel.root / shard.name).read_bytes(), shard.name


def test_the_loader_reads_shards_as_it_reads_one_file(
    stdlib_data, corpus, uninterrupted, tmp_path, log
):
    tokenizer, sharded = stdlib_data.tokenizer, uninterrupted
    single = build(tokenizer, corpus, tmp_path / "single", log, shard_chars=10**9)
    assert len(sharded.pieces["train"]) > 5 and len(single.pieces["train"]) == 1
    assert_same_tokens(sharded, single)
    loaders = [
        build_dataloader(PreparedData(tokenizer, cache), "train", 64, 4, 0, 1, seed=0)
        for cache in (sharded, single)
    ]
    for step in range(40):  # 40 x 4 windows of 65 from lanes all over the stream
        (a_in, a_lab), (b_in, b_lab) = (next(loader) for loader in loaders)
        assert a_in.equal(b_in) and a_lab.equal(b_lab), step
    assert loaders[0].state_dict() == loaders[1].state_dict()


def test_a_token_stream_indexes_across_pieces_and_pickles_as_its_pieces(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    tokens[:60].tofile(tmp_path / "a.bin")  # its last 10 tokens lie outside its piece
    tokens[40:].tofile(tmp_path / "b.bin")  # its first 10 too
    pieces = (Piece(tmp_path / "a.bin", 0, 50), Piece(tmp_path / "b.bin", 10, 50))
    stream = TokenStream(pieces, np.uint16)
    assert len(stream) == 100 and stream[0] == 0 and stream[-1] == 99 and stream[50] == 50
    assert np.array_equal(stream[45:55], tokens[45:55])  # across the two files
    assert np.array_equal(stream[10:20], tokens[10:20]) and len(stream[70:200]) == 30
    assert np.array_equal(np.asarray(stream), tokens)
    copy = pickle.loads(pickle.dumps(stream))
    assert len(pickle.dumps(stream)) < 1000 and np.array_equal(np.asarray(copy), tokens)
    assert len(TokenStream((), np.uint16)[0:5]) == 0
    with pytest.raises(IndexError):
        stream[100]
    with pytest.raises(IndexError):
        stream[::2]


def test_the_token_tail_held_out_spans_shards(stdlib_data, tmp_path, log):
    """Two documents, too few to hold one out: val is the stream's last 45%, which begins
    inside the first document (its shard) and takes the whole second one (another shard)."""
    texts = [text for _, text in Corpus(DataConfig(max_files=12)).documents()]
    (tmp_path / "a.txt").write_text("".join(texts[:10]))
    (tmp_path / "b.txt").write_text("".join(texts[10:]))
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], val_fraction=0.45)
    corpus, tok = Corpus(cfg), stdlib_data.tokenizer
    assert corpus.plan.by_tokens
    cache = build(tok, corpus, tmp_path / "cache", log, shard_chars=1)  # a shard per document
    assert len(list(cache.root.glob("shard-*.bin"))) == 2 and len(cache.pieces["train"]) == 1

    stream = np.concatenate(
        [[tok.bos_id, *tok.encode(text), tok.eos_id] for _, text in corpus.documents()]
    )
    cut = len(stream) - round(0.45 * len(stream))
    assert len(tok.encode(texts[-1])) < 0.45 * len(stream)  # the cut is in the first document
    assert np.array_equal(streams(cache)["train"], stream[:cut])
    assert np.array_equal(streams(cache)["val"], np.concatenate([[tok.bos_id], stream[cut:]]))
    assert cache.num_docs == {"train": 1, "val": 2} and cache.val_by_tokens
    assert_same_tokens(build(tok, corpus, tmp_path / "one-shard", log, shard_chars=10**9), cache)


def test_a_cache_in_the_single_file_layout_is_named_and_tokenized_again(
    stdlib_data, corpus, tmp_path, log
):
    tokenizer = stdlib_data.tokenizer
    identity = (file_sha1(tokenizer.path), (tokenizer.bos_id, tokenizer.eos_id))
    old = tmp_path / f"tokens-{cache_key(2, *identity, corpus.fingerprint)}.json"
    old.write_text("{}")  # what the earlier versions wrote last: their sidecar
    cache = build(tokenizer, corpus, tmp_path, log)
    assert any(f"{old} is a token cache in the single-file layout" in line for line in log)
    assert cache.num_docs == corpus.plan.num_docs


def test_prepare_data_passes_data_prepare_workers(stdlib_data, monkeypatch, tmp_path, log):
    seen = []

    def spy(*args):
        seen.append(args[5])
        return build_token_cache(*args)

    monkeypatch.setattr(prepare, "build_token_cache", spy)
    data_cfg = DataConfig(max_files=40, val_fraction=0.2, prepare_workers=3)
    tok_cfg = TokenizerConfig(path=str(stdlib_data.tokenizer.path))
    prepare.prepare_data(data_cfg, tok_cfg, tmp_path, show_progress=False, log=log)
    assert seen == [3]
