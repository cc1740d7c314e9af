"""Batches of packed sequences: an endless, resumable training stream and a fixed validation set."""

import itertools
import warnings
from collections.abc import Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from arbor_titan.data.dataset import PackedSequences
from arbor_titan.data.prepare import PreparedData

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenLoader:
    """Yields `(inputs[B, S], labels[B, S])` int64 batches of one rank's shard, epoch after epoch.

    `state_dict()` after k batches, loaded into a fresh loader, makes it yield batch k + 1 next,
    also across an epoch boundary.
    """

    def __init__(self, dataset: PackedSequences, split: str, batch_size: int, num_workers: int):
        self.dataset, self.split = dataset, split
        # torchdata 0.11 calls a torch API that 2.13 deprecated: noise that says nothing of our run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers
            )
        self._iter: Iterator | None = None

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._iter = iter(self._loader)
        try:
            inputs, labels = next(self._iter)
        except StopIteration:  # the epoch is over: reshuffle and go on
            self.dataset.set_epoch(self.epoch + 1)
            self._iter = iter(self._loader)
            inputs, labels = next(self._iter)
        return inputs, labels

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self._loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.set_epoch(state["epoch"])
        self._loader.load_state_dict(state["loader"])
        self._iter = None

    def val_batches(self, max_batches: int) -> Iterator[Batch]:
        """The first `max_batches` batches of the unshuffled split: the same every call."""
        if self.split != "val":
            raise ValueError(f"val_batches() needs a 'val' loader, this one reads {self.split!r}")
        return (tuple(batch) for batch in itertools.islice(iter(self._loader), max_batches))


def build_dataloader(
    prepared: PreparedData,
    split: str,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
    num_workers: int = 0,
) -> TokenLoader:
    """A loader over this rank's shard of `split`; training data is reshuffled every epoch."""
    if split not in prepared.cache.paths:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tokens = prepared.cache.tokens(split)
    dataset = PackedSequences(tokens, seq_len, dp_rank, dp_world, seed, shuffle=split == "train")
    if len(dataset) < batch_size:
        needed = batch_size * dp_world * (seq_len + 1)
        more = "a larger data.val_fraction" if split == "val" else "more data"
        raise ValueError(
            f"the {split} split has {len(tokens):,} tokens, fewer than one batch needs: "
            f"batch_size={batch_size} x dp_world={dp_world} x (seq_len={seq_len} + 1) = "
            f"{needed:,}; use a smaller training.seq_len or local_batch_size, or {more}"
        )
    return TokenLoader(dataset, split, batch_size, num_workers)
