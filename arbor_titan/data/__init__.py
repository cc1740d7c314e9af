"""Data: corpus sources, tokenizers (sentencepiece or tokenizer.json), a token cache, packing and
loading.

The trainer needs two calls: `prepare_data` (tokenizer + token files, built once and cached)
and `build_dataloader` (one rank's batches of one split).
"""

from arbor_titan.data.config import DataConfig, TokenizerConfig
from arbor_titan.data.corpus import Corpus
from arbor_titan.data.dataset import Documents, EpochStream, PackedSequences
from arbor_titan.data.lanes import LanePosition
from arbor_titan.data.loader import BatchOrigin, TokenLoader, build_dataloader
from arbor_titan.data.prepare import PreparedData, prepare_data
from arbor_titan.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "BatchOrigin",
    "Corpus",
    "DataConfig",
    "Documents",
    "EpochStream",
    "LanePosition",
    "PackedSequences",
    "PreparedData",
    "TokenLoader",
    "Tokenizer",
    "TokenizerConfig",
    "build_dataloader",
    "build_tokenizer",
    "load_tokenizer",
    "prepare_data",
]
