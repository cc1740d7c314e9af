"""A split's token stream read as one array, though it lies in pieces of several shard files.

Every piece is memory-mapped and nothing is read until sliced, so a split of any size costs
address space, not memory; a slice that crosses pieces is the one place tokens are copied.
"""

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Tokens `[start, start + count)` of the token file `path` (count > 0)."""

    path: Path
    start: int
    count: int


class TokenStream:
    """The concatenation of `pieces`, indexed like a 1-D array: `len`, an int, a contiguous
    slice (an ndarray), and `np.asarray` (the whole stream, read into memory)."""

    def __init__(self, pieces: tuple[Piece, ...], dtype: np.dtype):
        self.pieces, self.dtype = tuple(pieces), np.dtype(dtype)
        self._open()

    def _open(self) -> None:
        itemsize = self.dtype.itemsize
        self._maps = [
            np.memmap(p.path, self.dtype, "r", offset=p.start * itemsize, shape=(p.count,))
            for p in self.pieces
        ]
        # _bounds[i]: where piece i begins in the stream; _bounds[-1] is its length.
        self._bounds = np.cumsum([0, *(p.count for p in self.pieces)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def __getitem__(self, index: int | slice) -> np.ndarray | np.generic:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("a TokenStream is sliced with step 1 only")
            return self._read(start, max(start, stop))
        position = operator.index(index)
        position += len(self) if position < 0 else 0
        if not 0 <= position < len(self):
            raise IndexError(f"token {index} of a stream of {len(self)}")
        return self._read(position, position + 1)[0]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        tokens = np.asarray(self._read(0, len(self)))
        return tokens if dtype is None else tokens.astype(dtype)

    def __getstate__(self) -> dict:
        # The memory maps would pickle as copies of the files: send the pieces, reopen them.
        return {"pieces": self.pieces, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.pieces, self.dtype = state["pieces"], state["dtype"]
        self._open()

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)`: a view of one piece's map, or a copy joining several."""
        parts = []
        piece = int(np.searchsorted(self._bounds, start, side="right")) - 1
        while start < stop:
            begin, end = int(self._bounds[piece]), int(self._bounds[piece + 1])
            parts.append(self._maps[piece][start - begin : min(stop, end) - begin])
            start, piece = min(stop, end), piece + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)
