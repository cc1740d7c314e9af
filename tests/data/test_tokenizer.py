import functools

import pytest

from arbor_titan.data import Corpus, DataConfig, TokenizerConfig, build_tokenizer, prepare_data

# Real code, and variants with what the stdlib lacks but users' code has (its style checks ban
# tabs and trailing whitespace): a lossy tokenizer mangles each.
VARIANTS = {
    "as is": lambda text: text,
    "tab indents": lambda text: text.replace("    ", "\t"),
    "trailing spaces": lambda text: text.replace("\n", "  \t \n"),
    "CRLF line ends": lambda text: text.replace("\n", "\r\n"),
}


@functools.cache
def stdlib_samples() -> tuple[str, str]:
    """textwrap.py (blank lines, deep indents, docstrings) and the smallest non-ASCII module."""
    texts = dict(Corpus(DataConfig(val_fraction=0.0)).documents())
    return texts["textwrap.py"], min((t for t in texts.values() if not t.isascii()), key=len)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_on_real_stdlib_files(stdlib_data, variant):
    tokenizer = stdlib_data.tokenizer
    for text in map(VARIANTS[variant], stdlib_samples()):
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "   leading spaces",
        "\n\nleading newlines",
        "trailing  \t \n\n",
        "\r\nwindows\r\nline ends\r\n",
        "def f():\n\treturn  'é 世界 🐍'\n",
        "a literal ▁ space marker ▁▁",
        "\x00\x7f\u00a0\u3000\ufeff",
    ],
)
def test_round_trip_on_awkward_strings(stdlib_data, text):
    tokenizer = stdlib_data.tokenizer
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch([text, "x"]) == [tokenizer.encode(text), tokenizer.encode("x")]


def test_encode_adds_no_specials_and_ids_fit(stdlib_data, stdlib_cfgs):
    tokenizer = stdlib_data.tokenizer
    assert tokenizer.vocab_size == stdlib_cfgs[1].vocab_size
    assert len({tokenizer.bos_id, tokenizer.eos_id}) == 2
    ids = tokenizer.encode("import os\n")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert max(ids) < tokenizer.vocab_size


def test_second_prepare_reuses_tokenizer_and_token_cache(
    stdlib_cfgs, stdlib_cache_dir, stdlib_data, log
):
    files = sorted(stdlib_cache_dir.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = prepare_data(*stdlib_cfgs, stdlib_cache_dir, show_progress=False, log=log)
    assert any(line.startswith("reusing tokenizer") for line in log)
    assert any(line.startswith("reusing token cache") for line in log)
    assert sorted(stdlib_cache_dir.iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert again.tokenizer.path == stdlib_data.tokenizer.path


def test_given_tokenizer_path_is_loaded(stdlib_data, tmp_path, log):
    cfg = TokenizerConfig(path=str(stdlib_data.tokenizer.path))
    tokenizer = build_tokenizer(cfg, DataConfig(), tmp_path, log=log)
    assert tokenizer.encode("x = 1\n") == stdlib_data.tokenizer.encode("x = 1\n")
    assert not list(tmp_path.iterdir())


def test_missing_tokenizer_path_is_named(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path: .*nope\.model"):
        build_tokenizer(TokenizerConfig(path=str(missing)), DataConfig(), tmp_path)


def test_vocab_too_large_for_the_corpus_says_what_to_change(tmp_path, log):
    (tmp_path / "a.txt").write_text("tiny corpus\n")
    data_cfg = DataConfig(source="text", paths=[str(tmp_path / "a.txt")])
    with pytest.raises(ValueError, match="lower tokenizer.vocab_size"):
        build_tokenizer(TokenizerConfig(vocab_size=2000), data_cfg, tmp_path, log=log)
    assert not list(tmp_path.glob("*.model"))


def test_training_is_reproducible_and_keyed_by_its_settings(tmp_path, log):
    source = "".join(f"def f{i}(x):\n    return x * {i}  # ünïcode\n\n" for i in range(20_000))
    (tmp_path / "code.py").write_text(source)
    data_cfg = DataConfig(source="text", paths=[str(tmp_path / "code.py")])
    cfg = TokenizerConfig(vocab_size=300, max_sentences=200)  # of ~400 chunks: sampled
    first = build_tokenizer(cfg, data_cfg, tmp_path / "one", log=log)
    second = build_tokenizer(cfg, data_cfg, tmp_path / "two", log=log)
    assert first.path.name == second.path.name
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.decode(first.encode(source)) == source
    other = build_tokenizer(TokenizerConfig(vocab_size=320), data_cfg, tmp_path / "one", log=log)
    assert other.path != first.path and other.vocab_size == 320
