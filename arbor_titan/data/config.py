"""The `[data]` and `[tokenizer]` sections, and the checks their builders run."""

from dataclasses import dataclass, replace

from arbor_titan.config.fields import REQUIRED, option

SOURCES = ("stdlib", "text", "jsonl", "parquet", "hf_disk", "chat")


@dataclass
class SourceConfig:
    """One `[[data.sources]]` table: a corpus of a mixture and its share of the training tokens."""

    name: str = option(REQUIRED, "Names the source in metrics and checkpoints, e.g. 'web'.")
    weight: float = option(REQUIRED, "Share of training tokens (weights are normalized).", gt=0)
    source: str = option("stdlib", "As data.source: stdlib, text, jsonl, parquet, hf_disk.")
    paths: list[str] = option([], "As data.paths.")
    text_field: str = option("text", "As data.text_field.")
    max_files: int = option(0, "As data.max_files (0 = data.max_files).", ge=0)


@dataclass
class DataConfig:
    """The `[data]` section: which documents to train on and how to split them."""

    source: str = option(
        "stdlib",
        "Corpus: 'stdlib' (this Python's own library source), 'text', 'jsonl' or 'parquet' "
        "files, 'hf_disk' (a datasets.save_to_disk folder or its .arrow files; local only), or "
        "'chat' (JSONL conversations for fine-tuning, loss on the answers; see docs/sft.md).",
    )
    paths: list[str] = option(
        [], "Files or glob patterns ('**' recurses); for hf_disk also save_to_disk folders."
    )
    text_field: str = option(
        "text", "Key (jsonl) or column (parquet, hf_disk) holding each document's text."
    )
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
    prepare_workers: int = option(
        0,
        "Processes that tokenize the corpus into the token cache (0 = one per available core).",
        ge=0,
    )
    document_mask: bool = option(
        False, "Packed documents don't attend across their boundaries (each starts at a BOS)."
    )
    restart_positions: bool = option(
        False, "With document_mask: RoPE positions restart at 0 at each document."
    )
    sources: list[SourceConfig] = option(
        [],
        "A weighted mixture ([[data.sources]] tables) instead of data.source/paths/text_field; "
        "val_fraction, max_files and the rest apply to each source.",
    )

    def source_configs(self) -> dict[str, "DataConfig"]:
        """Each mixture source's own single-source config, by name."""
        return {
            s.name: replace(
                self,
                source=s.source,
                paths=s.paths,
                text_field=s.text_field,
                max_files=s.max_files or self.max_files,
                sources=[],
            )
            for s in self.sources
        }


@dataclass
class TokenizerConfig:
    """The `[tokenizer]` section: a tokenizer file to load, or how to train one."""

    path: str = option(
        "",
        "An existing sentencepiece .model or Hugging Face tokenizer.json; empty = train a "
        "sentencepiece BPE tokenizer on the corpus.",
    )
    bos_token: str = option(
        "",
        "tokenizer.json only: the BOS token's name; empty = the first found of <|begin_of_text|>, "
        "<s>, <bos>, [BOS], <|startoftext|>.",
    )
    eos_token: str = option(
        "",
        "tokenizer.json only: the EOS token's name; empty = the first found of <|end_of_text|>, "
        "</s>, <eos>, [EOS], <|endoftext|>.",
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
    if cfg.sources:
        _check_mixture(cfg)
        return
    if cfg.source not in SOURCES:
        names = ", ".join(repr(s) for s in SOURCES)
        raise ValueError(f"data.source must be one of {names}, got {cfg.source!r}")
    if cfg.source == "stdlib" and cfg.paths:
        raise ValueError("data.paths must be empty when data.source = 'stdlib'")
    if cfg.source != "stdlib" and not cfg.paths:
        raise ValueError(f"data.paths must name files or globs when data.source = {cfg.source!r}")
    if not cfg.text_field:
        raise ValueError("data.text_field must not be empty")
    if cfg.source == "chat":
        _check_chat(cfg)
    if cfg.restart_positions and not cfg.document_mask:
        raise ValueError(
            "data.restart_positions = true needs data.document_mask = true (positions restart "
            "at documents that the mask separates)"
        )


def _check_chat(cfg: DataConfig) -> None:
    if cfg.text_field != DataConfig().text_field:
        raise ValueError(
            "data.text_field does not apply to data.source = 'chat' (a line holds 'messages', or "
            "'prompt' and 'response'): leave it unset"
        )
    if cfg.prepare_workers:
        raise ValueError(
            "data.prepare_workers does not apply to data.source = 'chat' (conversations are "
            "tokenized in the training process, a fine-tuning set is small): leave it at 0"
        )
    if not cfg.document_mask:
        raise ValueError(
            "data.source = 'chat' packs conversations into shared windows and needs "
            "data.document_mask = true, so that no conversation attends to the one before it"
        )


def _check_mixture(cfg: DataConfig) -> None:
    single = DataConfig()
    given = [
        f"data.{key}"
        for key in ("source", "paths", "text_field")
        if getattr(cfg, key) != getattr(single, key)
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} describe a single source; with [[data.sources]] set them in each "
            "source's table"
        )
    if cfg.num_workers:
        raise ValueError(
            "data.num_workers > 0 is not supported with [[data.sources]]: a mixture reads its "
            "windows in-process (memory-mapped slices); set data.num_workers = 0"
        )
    if any(s.source == "chat" for s in cfg.sources):
        raise ValueError(
            "data.sources: source = 'chat' is not supported in a mixture; fine-tune on chat data "
            "with data.source = 'chat'"
        )
    names = [s.name for s in cfg.sources]
    if "" in names or len(set(names)) != len(names):
        raise ValueError(f"data.sources: each needs a distinct, non-empty name, got {names}")
    for name, source_cfg in cfg.source_configs().items():
        try:
            check_data_config(source_cfg)
        except ValueError as err:
            raise ValueError(f"data.sources[{name!r}]: {err}") from None
