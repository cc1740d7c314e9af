"""Packing: a token stream seen as fixed-length training sequences, shuffled and sharded by rank."""

import numpy as np
import torch
from torch.utils.data import Dataset


class PackedSequences(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens; this rank's share of one epoch's order.

    Epoch `e` visits windows in `default_rng(seed + e).permutation(num_seq)` order (or in stream
    order when `shuffle` is off); rank r takes every `dp_world`-th of them from position r, cut
    so that all ranks get the same number. Item i is `(inputs, labels)`, labels shifted by one.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
        self.tokens, self.seq_len = tokens, seq_len
        self.dp_rank, self.dp_world, self.seed, self.shuffle = dp_rank, dp_world, seed, shuffle
        self.num_seq = len(tokens) // (seq_len + 1)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch `epoch`'s order from this rank's `start`-th window on; call before a new
        pass (and before workers start)."""
        self.epoch, self.start = epoch, start
        order = np.arange(self.num_seq)
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_seq)
        per_rank = self.num_seq // self.dp_world
        self._windows = order[self.dp_rank :: self.dp_world][:per_rank][start:]

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self._windows[i]) * (self.seq_len + 1)
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

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
