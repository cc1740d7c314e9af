"""Packing: a split's documents, concatenated in an epoch's order and cut into training windows.

Nothing here copies the token stream: an epoch is a permutation of document indices plus two
int64 numbers per document, and a window is read as a few slices of the memory-mapped file.
"""

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from arbor_titan.data.lanes import LanePosition

# Tokens compared with BOS at a time while finding documents: bounds the scan's scratch memory.
_SCAN_TOKENS = 1 << 24


class Documents:
    """A split's token stream `[BOS] doc [EOS] [BOS] doc [EOS] ...` and where each document starts.

    The starts are found once, from the BOS tokens; `starts[-1]` is the stream's length.
    """

    def __init__(self, tokens: np.ndarray, bos_id: int):
        if len(tokens) and tokens[0] != bos_id:
            raise ValueError(
                f"a token stream must start with BOS ({bos_id}), this one starts with "
                f"{int(tokens[0])}: it is not a token cache file of this tokenizer"
            )
        self.tokens = tokens
        found = [
            np.flatnonzero(tokens[i : i + _SCAN_TOKENS] == bos_id) + i
            for i in range(0, len(tokens), _SCAN_TOKENS)
        ]
        self.starts = np.concatenate([*found, [len(tokens)]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __getstate__(self) -> dict:
        # A memmap would pickle as a full copy of the file: send its name and reopen instead.
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = (self.tokens.filename, self.tokens.dtype)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r")
        self.__dict__.update(state)


class EpochStream:
    """The documents concatenated in `order` (indices into `documents`): one epoch's stream.

    Epoch position p inside the k-th ordered document is file position p + `_shift[k]`.
    """

    def __init__(self, documents: Documents, order: np.ndarray):
        self.documents = documents
        lengths = np.diff(documents.starts)[order]
        # bounds[k]: where the k-th ordered document begins in the epoch stream.
        self.bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._shift = documents.starts[order] - self.bounds[:-1]

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens `[start, start + length)` of the stream as int64, across documents."""
        stop = start + length
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) are outside the stream of {len(self)}")
        out = np.empty(length, np.int64)
        doc = int(np.searchsorted(self.bounds, start, side="right")) - 1
        position = start
        while position < stop:
            piece_stop = min(stop, int(self.bounds[doc + 1]))
            shift = int(self._shift[doc])
            out[position - start : piece_stop - start] = self.documents.tokens[
                position + shift : piece_stop + shift
            ]
            position, doc = piece_stop, doc + 1
        return out


# Turns a window of `seq_len + 1` stream tokens into `(inputs, labels)` of `seq_len` each.
Labeler = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def next_token_labels(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-training: every next token is a label."""
    return window[:-1], window[1:]


def epoch_stream(documents: Documents, shuffle_seed: int | list[int] | None) -> EpochStream:
    """One epoch of `documents`: shuffled by `default_rng(shuffle_seed)` (training), or in file
    order when the seed is None (validation)."""
    count = len(documents)
    if shuffle_seed is None:
        return EpochStream(documents, np.arange(count))
    return EpochStream(documents, np.random.default_rng(shuffle_seed).permutation(count))


class PackedSequences(Dataset):
    """One data-parallel rank's windows of an epoch stream, read from `position` on.

    Global window m is `seq_len + 1` tokens at `position.window_start(m)` (far apart from its
    neighbours, see `LanePosition`); rank r of `dp_world` takes windows r, r + W, r + 2W, ...
    (item i is window i·W + r), and every rank gets the same number, so a batch of B items on
    every rank holds the next W·B windows. Item i is `labeler(window)`: `(inputs, labels)`,
    labels shifted by one.
    """

    def __init__(
        self,
        stream: EpochStream,
        position: LanePosition,
        seq_len: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        labeler: Labeler = next_token_labels,
    ):
        self.stream, self.position, self.seq_len = stream, position, seq_len
        self.dp_rank, self.dp_world, self.labeler = dp_rank, dp_world, labeler
        self._len = position.windows_left(seq_len + 1) // dp_world

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} of {self._len}")
        window = self.seq_len + 1
        start = self.position.window_start(i * self.dp_world + self.dp_rank, window)
        return self.labeler(torch.from_numpy(self.stream.read(start, window)))
