"""The one entry point the trainer calls: a tokenizer and memory-mapped token files per split
(per source, for a `[[data.sources]]` mixture).

Idempotent: everything it builds is cached under `cache_dir` by content, so rank 0 can call it
first while the other ranks wait on a barrier, and their own call then only loads.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arbor_titan.data.chat import prepare_chat
from arbor_titan.data.config import DataConfig, TokenizerConfig, check_data_config
from arbor_titan.data.corpus import Corpus, MixedCorpus, describe_skips
from arbor_titan.data.token_cache import TokenCache, build_token_cache
from arbor_titan.data.tokenizer import Tokenizer, load_or_train_tokenizer


@dataclass(frozen=True)
class SourceCache:
    """A mixture source's token cache and its normalized share of the training tokens."""

    weight: float
    cache: TokenCache


@dataclass(frozen=True)
class PreparedData:
    """The tokenizer and the token cache that the data loaders read: `cache` for one source,
    `mixture` (by source name, in config order) for [[data.sources]]."""

    tokenizer: Tokenizer
    cache: TokenCache | None
    mixture: dict[str, SourceCache] = field(default_factory=dict)
    chat: bool = False  # the cache's stream flags answer tokens (data/chat.py)


def prepare_data(
    data_cfg: DataConfig,
    tok_cfg: TokenizerConfig,
    cache_dir: Path,
    show_progress: bool,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Train or load the tokenizer, then build or reuse the token cache of both splits.

    `show_progress` enables the stderr progress bar; pass it only on the process that builds.
    """
    check_data_config(data_cfg)
    if data_cfg.source == "chat":
        tokenizer, cache = prepare_chat(data_cfg, tok_cfg, cache_dir, log)
        return PreparedData(tokenizer, cache, chat=True)
    if not data_cfg.sources:
        corpus = Corpus(data_cfg)
        tokenizer = load_or_train_tokenizer(tok_cfg, corpus, cache_dir, log)
        cache = build_token_cache(
            tokenizer, corpus, cache_dir, show_progress, log, data_cfg.prepare_workers
        )
        _log_sizes("data", cache, data_cfg, log)
        return PreparedData(tokenizer, cache)
    corpora = {name: Corpus(cfg) for name, cfg in data_cfg.source_configs().items()}
    tokenizer = load_or_train_tokenizer(
        tok_cfg, MixedCorpus(list(corpora.values())), cache_dir, log
    )
    total = sum(s.weight for s in data_cfg.sources)
    mixture = {}
    for source in data_cfg.sources:
        cache = build_token_cache(
            tokenizer, corpora[source.name], cache_dir, show_progress, log, data_cfg.prepare_workers
        )
        _log_sizes(f"data source {source.name!r}", cache, data_cfg, log)
        mixture[source.name] = SourceCache(source.weight / total, cache)
    return PreparedData(tokenizer, None, mixture)


def _log_sizes(
    what: str, cache: TokenCache, data_cfg: DataConfig, log: Callable[[str], None]
) -> None:
    val = f"val {cache.num_tokens['val']:,} tokens ({cache.num_docs['val']} documents)"
    if cache.val_by_tokens:
        val = (
            f"val {cache.num_tokens['val']:,} tokens: the last {data_cfg.val_fraction * 100:g}% of "
            "the token stream, as the corpus has too few documents to hold whole ones out "
            "(data.val_fraction of them would be less than one)"
        )
    log(
        f"{what}: train {cache.num_tokens['train']:,} tokens ({cache.num_docs['train']} "
        f"documents), {val}; {describe_skips(cache.skipped)}"
    )
