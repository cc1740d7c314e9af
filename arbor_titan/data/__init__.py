"""Data: corpus sources, tokenizers (sentencepiece or tokenizer.json), a token cache, packing and
loading.

The trainer needs two calls: `prepare_data` (tokenizer + token files, built once and cached)
and `build_dataloader` (one rank's batches of one split).

The names below are imported on first use, so that importing one submodule (as a tokenizing
worker process does: `shards`) doesn't also import torch and the model.
"""

import importlib

# Each exported name and the submodule that defines it.
_SUBMODULE_OF = {
    "BatchOrigin": "loader",
    "Corpus": "corpus",
    "DataConfig": "config",
    "Documents": "dataset",
    "EpochStream": "dataset",
    "LanePosition": "lanes",
    "PackedSequences": "dataset",
    "PreparedData": "prepare",
    "TokenLoader": "loader",
    "Tokenizer": "tokenizer",
    "TokenizerConfig": "config",
    "build_dataloader": "loader",
    "build_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "prepare_data": "prepare",
}

__all__ = list(_SUBMODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
