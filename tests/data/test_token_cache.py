import re

import numpy as np
import pytest

from arbor_titan.data import Corpus, DataConfig, TokenizerConfig, build_dataloader, prepare_data
from arbor_titan.data.progress import Progress
from arbor_titan.data.token_cache import token_dtype

DOCS = {
    "a.txt": "def a():\n    return 1\n",
    "b.txt": "  leading spaces\n\n\ttab\n",
    "c.txt": "unicode: é 世界\n",
    "d.txt": "x = [\n    1,\n]\n",
    "e.txt": "",  # skipped and counted
    "f.txt": b"\xff not utf-8",  # skipped and counted
}


@pytest.fixture
def text_cfgs(tmp_path, stdlib_data) -> tuple[DataConfig, TokenizerConfig]:
    """A handful of text files, tokenized with the session tokenizer (no training here)."""
    for name, text in DOCS.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    data_cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], val_fraction=0.3)
    return data_cfg, TokenizerConfig(path=str(stdlib_data.tokenizer.path))


def split_documents(tokens: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """Cut a `[BOS] doc [EOS] ...` stream back into documents, checking the framing."""
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1
    docs, start = [], 0
    for end in ends:
        assert tokens[start] == bos
        docs.append(tokens[start + 1 : end].tolist())
        start = end + 1
    return docs


def test_streams_are_bos_doc_eos_in_order_per_split(text_cfgs, tmp_path, log):
    data = prepare_data(*text_cfgs, tmp_path / "cache", show_progress=False, log=log)
    tok = data.tokenizer
    corpus = Corpus(text_cfgs[0])
    for split in ("train", "val"):
        texts = [text for _, text in corpus.documents(split)]
        assert texts
        tokens = data.cache.tokens(split)
        assert tokens.dtype == np.uint16 and len(tokens) == data.cache.num_tokens[split]
        docs = split_documents(np.asarray(tokens), tok.bos_id, tok.eos_id)
        assert [tok.decode(ids) for ids in docs] == texts
    assert data.cache.skipped == {"empty": 1, "invalid UTF-8": 1}
    assert any("skipped 2 documents: 1 empty, 1 invalid UTF-8" in line for line in log)


def test_cache_is_reused_and_leaves_no_temporary_files(text_cfgs, tmp_path, log):
    cache_dir = tmp_path / "cache"
    prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    files = {f: f.stat().st_mtime_ns for f in cache_dir.rglob("*")}
    # One shard (the corpus is small) and the manifest; no temporary file is left behind.
    assert sorted(f.name for f in files if f.is_file()) == ["manifest.json", "shard-00000.bin"]
    log.clear()
    prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    assert any(line.startswith("reusing token cache") for line in log)
    assert {f: f.stat().st_mtime_ns for f in cache_dir.rglob("*")} == files


def test_token_files_without_manifest_are_rebuilt(text_cfgs, tmp_path, log):
    """A crash after the token files but before the manifest must not look like a cache."""
    cache_dir = tmp_path / "cache"
    first = prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    next(cache_dir.glob("tokens-*/manifest.json")).unlink()
    log.clear()
    again = prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    assert any(line.startswith("tokenized") for line in log)
    assert np.array_equal(again.cache.tokens("train"), first.cache.tokens("train"))


def test_corpus_change_makes_a_new_cache(text_cfgs, tmp_path, log):
    cache_dir = tmp_path / "cache"
    first = prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    (tmp_path / "g.txt").write_text("a new document\n")
    second = prepare_data(*text_cfgs, cache_dir, show_progress=False, log=log)
    assert second.cache.root != first.cache.root
    assert sum(second.cache.num_docs.values()) == sum(first.cache.num_docs.values()) + 1


@pytest.mark.parametrize("show_progress", [True, False])
def test_progress_bar_only_when_asked(text_cfgs, tmp_path, log, capsys, show_progress):
    prepare_data(*text_cfgs, tmp_path / "cache", show_progress=show_progress, log=log)
    err = capsys.readouterr().err
    line = r"tokenizing: 4/4 documents, 0\.0 MB at [\d.]+ MB/s, \d+ tokens, done in \d+s\n$"
    assert bool(re.search(line, err)) == show_progress
    assert show_progress or err == ""


def test_no_validation_split_gives_an_empty_stream_and_a_clear_loader_error(
    text_cfgs, tmp_path, log
):
    data_cfg, tok_cfg = text_cfgs
    data_cfg.val_fraction = 0.0
    data = prepare_data(data_cfg, tok_cfg, tmp_path / "cache", show_progress=False, log=log)
    assert len(data.cache.tokens("val")) == 0 and data.cache.num_docs["val"] == 0
    with pytest.raises(ValueError, match="val split has 0 tokens.*larger data.val_fraction"):
        build_dataloader(data, "val", 8, 1, 0, 1, seed=0)


def test_token_dtype_widens_past_16_bits():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_progress_counts_resumed_work_in_totals_not_in_the_rate(capsys):
    progress = Progress("tokenizing", total_docs=10, total_chars=1000, enabled=True, every_s=0)
    progress.add_done(docs=5, chars=500, tokens=120)  # what an interrupted run did
    progress.update(docs=1, chars=100, nbytes=2_000_000, tokens=30)
    line = capsys.readouterr().err
    # 400 characters are left and 100 took this run `elapsed`: 4 x elapsed to go.
    assert re.fullmatch(
        r"\rtokenizing: 6/10 documents, 2\.0 MB at [\d.]+ MB/s, 150 tokens, "
        r"ETA \d+s",
        line,
    )
    progress.update(docs=4, chars=400, nbytes=0, tokens=90)
    progress.close()
    assert re.search(r"10/10 documents, .* 240 tokens, done in \d+s\n$", capsys.readouterr().err)
