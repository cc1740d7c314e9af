"""The one entry point the trainer calls: a tokenizer and memory-mapped token files per split.

Idempotent: everything it builds is cached under `cache_dir` by content, so rank 0 can call it
first while the other ranks wait on a barrier, and their own call then only loads.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from arbor_titan.data.config import DataConfig, TokenizerConfig
from arbor_titan.data.corpus import Corpus, describe_skips
from arbor_titan.data.token_cache import TokenCache, build_token_cache
from arbor_titan.data.tokenizer import Tokenizer, load_or_train_tokenizer


@dataclass(frozen=True)
class PreparedData:
    """The tokenizer and the token cache that the data loaders read."""

    tokenizer: Tokenizer
    cache: TokenCache


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
    corpus = Corpus(data_cfg)
    tokenizer = load_or_train_tokenizer(tok_cfg, corpus, cache_dir, log)
    cache = build_token_cache(tokenizer, corpus, cache_dir, show_progress, log)
    val = f"val {cache.num_tokens['val']:,} tokens ({cache.num_docs['val']} documents)"
    if cache.val_by_tokens:
        val = (
            f"val {cache.num_tokens['val']:,} tokens: the last {data_cfg.val_fraction * 100:g}% of "
            "the token stream, as the corpus has too few documents to hold whole ones out "
            "(data.val_fraction of them would be less than one)"
        )
    log(
        f"data: train {cache.num_tokens['train']:,} tokens ({cache.num_docs['train']} documents), "
        f"{val}; {describe_skips(cache.skipped)}"
    )
    return PreparedData(tokenizer, cache)
