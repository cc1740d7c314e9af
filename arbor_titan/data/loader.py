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
        self.batch_size, self.num_workers = batch_size, num_workers
        self._loader = self._new_loader()
        self._iter: Iterator | None = None
        self._consumed = 0  # windows of this rank's shard taken in the current epoch

    def _new_loader(self) -> StatefulDataLoader:
        # torchdata 0.11 calls a torch API that 2.13 deprecated: noise that says nothing of our run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return StatefulDataLoader(
                self.dataset,
                batch_size=self.batch_size,
                drop_last=True,
                num_workers=self.num_workers,
            )

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
            self._start_epoch(self.epoch + 1, start=0)
            self._iter = iter(self._loader)
            inputs, labels = next(self._iter)
        self._consumed += len(inputs)
        return inputs, labels

    def _start_epoch(self, epoch: int, start: int) -> None:
        self.dataset.set_epoch(epoch, start)
        self._consumed = start

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "loader": self._loader.state_dict(),
            "start": self.dataset.start,
            # Sequences of this epoch that all data-parallel ranks together have consumed: the
            # layout-free position, since rank r reads windows r, r + world, r + 2·world, ...
            "global_consumed": self._consumed * self.dataset.dp_world,
            "dp_world": self.dataset.dp_world,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly on the same layout; on another data-parallel world size, resume at the
        same global position (rounded down to a whole window per rank)."""
        same_layout = (state["dp_world"], state["batch_size"]) == (
            self.dataset.dp_world,
            self.batch_size,
        )
        if same_layout:
            self._start_epoch(state["epoch"], state["start"])
            self._loader.load_state_dict(state["loader"])
            self._consumed = state["global_consumed"] // self.dataset.dp_world
        else:
            self._start_epoch(state["epoch"], state["global_consumed"] // self.dataset.dp_world)
            self._loader = self._new_loader()
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
