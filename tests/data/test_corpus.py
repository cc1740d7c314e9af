import json
from pathlib import Path

import pytest

from arbor_titan.data import Corpus, DataConfig
from arbor_titan.data.corpus import describe_skips, unit_hash


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def text_corpus(*paths, **kwargs) -> Corpus:
    return Corpus(DataConfig(source="text", paths=[str(p) for p in paths], **kwargs))


def test_stdlib_lists_the_library_sorted_without_site_packages():
    corpus = Corpus(DataConfig())
    names = [name for name, _ in corpus.files]
    assert len(names) > 1000
    assert names == sorted(names)
    assert all(name.endswith(".py") for name in names)
    assert not any("site-packages" in name or "dist-packages" in name for name in names)
    assert [n for n, _ in Corpus(DataConfig(max_files=5)).files] == names[:5]


def test_text_globs_recurse_sort_and_keep_bytes_exactly(tmp_path):
    write(tmp_path / "b" / "deep" / "y.txt", "two\r\n\ttabs  \n")
    write(tmp_path / "a" / "x.txt", "one")
    write(tmp_path / "skip.md", "not matched")
    corpus = text_corpus(tmp_path / "**" / "*.txt", val_fraction=0.0)
    docs = list(corpus.documents())
    assert [text for _, text in docs] == ["one", "two\r\n\ttabs  \n"]
    assert [name for name, _ in docs] == sorted(name for name, _ in docs)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.paths: no such file .*nope\.txt"):
        text_corpus(tmp_path / "nope.txt")


def test_glob_matching_nothing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.jsonl' matches no files"):
        text_corpus(tmp_path / "*.jsonl")


def test_directory_path_suggests_a_glob(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        text_corpus(tmp_path)


def test_empty_corpus_is_an_error(tmp_path):
    corpus = text_corpus(write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match="no usable documents.*1 empty"):
        list(corpus.documents())


def test_invalid_utf8_file_is_skipped_and_counted(tmp_path):
    good = write(tmp_path / "good.txt", "fine")
    bad = write(tmp_path / "bad.txt", b"caf\xe9")
    corpus = text_corpus(good, bad, val_fraction=0.0)
    assert list(corpus.documents()) == [(good.as_posix(), "fine")]
    assert dict(corpus.plan.skipped) == {"invalid UTF-8": 1}
    assert describe_skips(corpus.plan.skipped) == "skipped 1 document: 1 invalid UTF-8"


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path):
    lines = [
        json.dumps({"text": "first"}),
        json.dumps({"body": "no text key"}),
        "{not json",
        "",
        json.dumps({"text": 3}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "second", "meta": 1}),
        json.dumps({"text": "third"}),
    ]
    path = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    corpus = Corpus(DataConfig(source="jsonl", paths=[str(path)], val_fraction=0.0))
    docs = list(corpus.documents())
    assert docs == [
        (f"{path.as_posix()}:{i}", t) for i, t in [(1, "first"), (7, "second"), (8, "third")]
    ]
    assert describe_skips(corpus.plan.skipped) == (
        "skipped 4 documents: 2 missing field 'text', 1 invalid JSON, 1 non-string field 'text'"
    )


def test_all_documents_skipped_is_an_error_with_the_reasons(tmp_path):
    path = write(tmp_path / "docs.jsonl", '{"body": "x"}\n{"body": "y"}\n')
    corpus = Corpus(DataConfig(source="jsonl", paths=[str(path)]))
    with pytest.raises(ValueError, match="skipped 2 documents: 2 missing field 'text'"):
        corpus.plan  # noqa: B018


def test_val_split_is_stable_disjoint_and_unaffected_by_new_files(tmp_path):
    for i in range(60):
        write(tmp_path / f"doc{i:03d}.txt", f"document {i}")
    pattern = tmp_path / "*.txt"
    corpus = text_corpus(pattern, val_fraction=0.2)
    train = [name for name, _ in corpus.documents("train")]
    val = [name for name, _ in corpus.documents("val")]
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == [name for name, _ in corpus.files]
    assert all(unit_hash(name) < 0.2 for name in val)
    assert [name for name, _ in text_corpus(pattern, val_fraction=0.2).documents("val")] == val
    for i in range(60, 90):
        write(tmp_path / f"doc{i:03d}.txt", f"document {i}")
    grown = text_corpus(pattern, val_fraction=0.2).plan
    assert set(val) <= grown.val_names
    assert not set(train) & grown.val_names


def test_tiny_corpus_splits_by_tokens_or_keeps_one_document_in_each_split(tmp_path):
    a = write(tmp_path / "a.txt", "a")
    b = write(tmp_path / "b.txt", "b")
    too_few = text_corpus(a, b, val_fraction=0.001).plan  # 0.002 documents: split by tokens
    assert too_few.by_tokens and too_few.num_docs == {"train": 2, "val": 0}
    assert text_corpus(a, val_fraction=0.999).plan.by_tokens
    by_documents = text_corpus(a, b, val_fraction=0.999).plan
    assert not by_documents.by_tokens and by_documents.num_docs == {"train": 1, "val": 1}


def test_fingerprint_follows_file_changes_and_split(tmp_path):
    path = write(tmp_path / "a.txt", "a")
    before = text_corpus(path).fingerprint
    assert text_corpus(path).fingerprint == before
    assert text_corpus(path, val_fraction=0.5).fingerprint != before
    write(path, "changed")
    assert text_corpus(path).fingerprint != before
