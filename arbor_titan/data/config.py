"""The `[data]` and `[tokenizer]` sections, and the checks their builders run."""

from dataclasses import dataclass

from arbor_titan.config.fields import option

SOURCES = ("stdlib", "text", "jsonl")


@dataclass
class DataConfig:
    """The `[data]` section: which documents to train on and how to split them."""

    source: str = option(
        "stdlib", "Corpus: 'stdlib' (this Python's own library source), 'text' or 'jsonl' files."
    )
    paths: list[str] = option([], "Files or glob patterns ('**' recurses) for text/jsonl sources.")
    text_field: str = option("text", "Key of the document text in each JSONL object.")
    val_fraction: float = option(
        0.02,
        "Share of documents held out for validation, chosen by a stable hash of their name.",
        ge=0,
        lt=1,
    )
    max_files: int = option(0, "Use only the first N files after sorting (0 = all).", ge=0)
    num_workers: int = option(
        0, "Data loader worker processes per rank (0 = load in-process).", ge=0
    )
    document_mask: bool = option(
        False, "Packed documents don't attend across their boundaries (each starts at a BOS)."
    )
    restart_positions: bool = option(
        False, "With document_mask: RoPE positions restart at 0 at each document."
    )


@dataclass
class TokenizerConfig:
    """The `[tokenizer]` section: a sentencepiece model to load, or how to train one."""

    path: str = option(
        "", "An existing sentencepiece .model file; empty = train one on the corpus."
    )
    # 256 byte-fallback pieces plus unk/bos/eos must fit, with room for real merges.
    vocab_size: int = option(2000, "Vocabulary size when training a tokenizer.", ge=300)
    max_sentences: int = option(
        400000,
        "Cap on corpus chunks sampled for tokenizer training, to keep it fast.",
        gt=100,  # sentencepiece's own lower bound
    )


def check_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the `data.*` key whose value cannot work."""
    if cfg.source not in SOURCES:
        names = ", ".join(repr(s) for s in SOURCES)
        raise ValueError(f"data.source must be one of {names}, got {cfg.source!r}")
    if cfg.source == "stdlib" and cfg.paths:
        raise ValueError("data.paths must be empty when data.source = 'stdlib'")
    if cfg.source != "stdlib" and not cfg.paths:
        raise ValueError(f"data.paths must name files or globs when data.source = {cfg.source!r}")
    if not cfg.text_field:
        raise ValueError("data.text_field must not be empty")
    if cfg.restart_positions and not cfg.document_mask:
        raise ValueError(
            "data.restart_positions = true needs data.document_mask = true (positions restart "
            "at documents that the mask separates)"
        )
