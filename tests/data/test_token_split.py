"""A corpus of few large documents: its validation split is the last `val_fraction` of the token
stream, since holding out whole documents would take nothing (one file) or half (two)."""

import numpy as np
import pytest

from arbor_titan.data import Corpus, DataConfig, TokenizerConfig, build_dataloader, prepare_data


def text_of(files: int) -> str:
    """Real text: the first stdlib sources the session tokenizer was trained on."""
    corpus = Corpus(DataConfig(max_files=files, val_fraction=0.0))
    return "".join(text for _, text in corpus.documents())


def data_cfg(tmp_path, texts: dict[str, str], val_fraction: float) -> DataConfig:
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    return DataConfig(source="text", paths=[str(tmp_path / "*.txt")], val_fraction=val_fraction)


def test_one_large_file_holds_out_the_tail_of_its_tokens(tmp_path, stdlib_data, log):
    text = text_of(20)
    cfg = data_cfg(tmp_path, {"big.txt": text}, val_fraction=0.1)
    assert Corpus(cfg).plan.by_tokens
    tok_cfg = TokenizerConfig(path=str(stdlib_data.tokenizer.path))
    data = prepare_data(cfg, tok_cfg, tmp_path / "cache", show_progress=False, log=log)

    tok = data.tokenizer
    stream = np.array([tok.bos_id, *tok.encode(text), tok.eos_id])
    cut = len(stream) - round(0.1 * len(stream))
    train, val = np.asarray(data.cache.tokens("train")), np.asarray(data.cache.tokens("val"))
    assert np.array_equal(train, stream[:cut])
    # The document cut in two continues in the val file behind a BOS of its own.
    assert np.array_equal(val, np.concatenate([[tok.bos_id], stream[cut:]]))
    assert data.cache.num_docs == {"train": 1, "val": 1} and data.cache.val_by_tokens
    assert any("the last 10% of the token stream" in line for line in log)
    for split in ("train", "val"):  # both splits feed a loader
        loader = build_dataloader(data, split, 64, 2, 0, 1, seed=0)
        inputs, labels = next(iter(loader))
        assert inputs.shape == labels.shape == (2, 64)


def test_two_files_split_by_tokens_and_the_cache_reloads(tmp_path, stdlib_data, log):
    texts = {"a.txt": text_of(3), "b.txt": text_of(6)}
    cfg = data_cfg(tmp_path, texts, val_fraction=0.02)
    tok_cfg = TokenizerConfig(path=str(stdlib_data.tokenizer.path))
    first = prepare_data(cfg, tok_cfg, tmp_path / "cache", show_progress=False, log=log)
    total = sum(first.cache.num_tokens.values()) - 1  # less the val file's BOS
    assert first.cache.num_tokens["val"] - 1 == round(0.02 * total)
    assert first.cache.num_docs == {"train": 2, "val": 1}
    log.clear()
    again = prepare_data(cfg, tok_cfg, tmp_path / "cache", show_progress=False, log=log)
    assert any(line.startswith("reusing token cache") for line in log)
    assert again.cache == first.cache


@pytest.mark.parametrize(("documents", "by_tokens"), [(49, True), (50, False)])
def test_documents_are_held_out_whole_once_val_fraction_of_them_reaches_one(
    tmp_path, documents, by_tokens
):
    texts = {f"doc{i:03d}.txt": f"document {i}\n" for i in range(documents)}
    plan = Corpus(data_cfg(tmp_path, texts, val_fraction=0.02)).plan
    assert plan.by_tokens == by_tokens
    assert (plan.num_docs["val"] == 0) == by_tokens
    assert sum(plan.num_docs.values()) == documents
