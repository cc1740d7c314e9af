"""Batches of packed documents: an endless training stream whose sequence length and micro-batch
may change mid-run without losing or repeating a token, and a fixed validation set."""

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from arbor_titan.data.chat import answer_labels
from arbor_titan.data.dataset import (
    Documents,
    EpochStream,
    Labeler,
    PackedSequences,
    epoch_stream,
    next_token_labels,
)
from arbor_titan.data.lanes import LanePosition
from arbor_titan.data.mixture import MixtureLoader
from arbor_titan.data.prepare import PreparedData
from arbor_titan.data.token_cache import TokenCache

logger = logging.getLogger("arbor_titan")

Batch = tuple[torch.Tensor, torch.Tensor]

# What a saved loader state holds; older loaders (fixed windows, one cursor) saved other keys.
_STATE_KEYS = (
    "epoch",
    "split_tokens",
    "lane_length",
    "lane_offsets",
    "next_lane",
    "seq_len",
    "batch_size",
    "dp_world",
)


@dataclass(frozen=True)
class BatchOrigin:
    """Where one batch of every data-parallel rank together came from: `windows` windows of
    `window` tokens of epoch `epoch`'s stream, from `position` on."""

    epoch: int
    position: LanePosition
    windows: int
    window: int

    def spans(self) -> list[tuple[int, int]]:
        """`[start, stop)` of each global window in the epoch stream, in global window order."""
        starts = (self.position.window_start(m, self.window) for m in range(self.windows))
        return [(start, start + self.window) for start in starts]


class TokenLoader:
    """Yields `(inputs[B, S], labels[B, S])` int64 batches: one rank's share of the split.

    An epoch's stream is the split's documents, concatenated in a per-epoch random order
    (training) or in file order (validation). Every batch of all data-parallel ranks together
    takes the next `dp_world · batch_size` windows of `seq_len + 1` tokens, drawn from far-apart
    lanes of the stream (`LanePosition`, cut at the epoch's first batch); the position alone
    says where the run is, whatever the layout. `set_shape` changes the window length and
    micro-batch from the next batch on, where every lane stopped. An epoch ends when a batch no
    longer fits its lanes; the unread rest is dropped and the next epoch starts afresh.
    """

    def __init__(
        self,
        documents: Documents,
        split: str,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
        num_workers: int = 0,
        labeler: Labeler = next_token_labels,
    ):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
        self.documents, self.split = documents, split
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.num_workers, self.labeler = seed, num_workers, labeler
        self.shuffle = split == "train"
        self._check_fits(
            seq_len, batch_size, "use a smaller training.seq_len or training.local_batch_size"
        )
        self.seq_len, self.batch_size = seq_len, batch_size
        self.epoch = 0
        self.position: LanePosition | None = None  # None until the epoch's first batch
        self.last_origin: BatchOrigin | None = None
        self._stream = self._epoch_stream(0)
        self._batches: Iterator | None = None

    @property
    def windows_per_batch(self) -> int:
        """Windows one batch of every rank consumes."""
        return self.dp_world * self.batch_size

    def set_shape(self, seq_len: int, batch_size: int) -> None:
        """Cut windows of `seq_len + 1` tokens into batches of `batch_size` from the next batch
        on, starting where the previous batch stopped in every lane."""
        self._check_fits(seq_len, batch_size, "use a shorter seq_len or a smaller batch")
        if (seq_len, batch_size) != (self.seq_len, self.batch_size):
            self.seq_len, self.batch_size = seq_len, batch_size
            self._batches = None  # prefetched batches of the old shape are dropped, not consumed

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> Batch:
        batch = next(self._current_batches(), None)
        if batch is None:  # the epoch is over: reshuffle and go on
            self._log_epoch_end()
            self._go_to(self.epoch + 1, position=None)
            batch = next(self._current_batches())
        window = self.seq_len + 1
        self.last_origin = BatchOrigin(self.epoch, self.position, self.windows_per_batch, window)
        self.position = self.position.advanced(self.windows_per_batch, window)
        inputs, labels = batch
        return inputs, labels

    def _log_epoch_end(self) -> None:
        """Say how much of the epoch was read: after a change to longer windows, lanes cut for
        short ones can leave much of it unread."""
        if self.dp_rank != 0:
            return
        total, read = self.documents.num_tokens, self.position.consumed
        logger.info(
            "%s data: epoch %d done, %s of %s tokens read (%.1f%% left unread: lane tails "
            "shorter than a window of %d); epoch %d starts, reshuffled",
            self.split,
            self.epoch,
            f"{read:,}",
            f"{total:,}",
            100 * (total - read) / total,
            self.seq_len + 1,
            self.epoch + 1,
        )

    def _current_batches(self) -> Iterator:
        if self.position is None:
            self.position = LanePosition.start(
                self.documents.num_tokens, self.seq_len + 1, self.windows_per_batch
            )
        if self._batches is None:
            self._batches = iter(self._loader(self._stream, self.position, self.seq_len))
        return self._batches

    def state_dict(self) -> dict:
        """The position (epoch and lanes) and the shape; `dp_world` tells whether the per-rank
        batch size applies where it is loaded. Lanes not yet cut are saved as none."""
        position = self.position or LanePosition(0, ())
        return {
            "epoch": self.epoch,
            "split_tokens": self.documents.num_tokens,
            "lane_length": position.lane_length,
            "lane_offsets": list(position.offsets),
            "next_lane": position.next_lane,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "dp_world": self.dp_world,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved global position on any data-parallel layout.

        The sequence length is restored; the micro-batch size too when the data-parallel world
        size is the saved one. On another world size the per-rank batch size this loader was
        built with (the new layout's configuration) stays.
        """
        self.check_state_keys(state)
        if int(state["split_tokens"]) != self.documents.num_tokens:
            raise ValueError(
                f"the saved data position is in a {self.split} split of "
                f"{int(state['split_tokens']):,} tokens, this one has "
                f"{self.documents.num_tokens:,}: the data.* settings or the corpus changed "
                "since the checkpoint"
            )
        offsets = tuple(int(offset) for offset in state["lane_offsets"])
        position = None
        if offsets:
            position = LanePosition(int(state["lane_length"]), offsets, int(state["next_lane"]))
        same_layout = int(state["dp_world"]) == self.dp_world
        batch_size = int(state["batch_size"]) if same_layout else self.batch_size
        self.set_shape(int(state["seq_len"]), batch_size)
        self._go_to(int(state["epoch"]), position)

    @staticmethod
    def check_state_keys(keys: Iterable[str]) -> None:
        """Refuse a saved state that has no token cursor, before anything is read into it.

        A checkpoint reader calls this with the saved keys: DCP would otherwise only report
        the first key it misses."""
        saved = set(keys)
        missing = [key for key in _STATE_KEYS if key not in saved]
        if missing:
            raise ValueError(
                f"the data loader state lacks {', '.join(missing)}: it was saved by an older "
                "arbor_titan loader, and its data position can't be resumed; start a new run "
                "from its weights with checkpoint.initial_load_path"
            )

    def val_batches(self, max_batches: int, seq_len: int | None = None) -> Iterator[Batch]:
        """The first `max_batches` batches of the split in file order, of windows of `seq_len`
        (default: the loader's): the same every call."""
        if self.split != "val":
            raise ValueError(f"val_batches() needs a 'val' loader, this one reads {self.split!r}")
        seq_len = self.seq_len if seq_len is None else seq_len
        self._check_fits(seq_len, self.batch_size, "validate at a shorter seq_len")
        whole_file = LanePosition(self.documents.num_tokens, (0,))
        batches = self._loader(self._stream, whole_file, seq_len)
        return (tuple(batch) for batch in itertools.islice(batches, max_batches))

    def _go_to(self, epoch: int, position: LanePosition | None) -> None:
        if epoch != self.epoch:
            self._stream = self._epoch_stream(epoch)
        self.epoch, self.position = epoch, position
        self._batches = None

    def _epoch_stream(self, epoch: int) -> EpochStream:
        return epoch_stream(self.documents, self.seed + epoch if self.shuffle else None)

    def _loader(self, stream: EpochStream, position: LanePosition, seq_len: int) -> DataLoader:
        """Batches of this rank's windows from `position`. A shape change or a resume builds a
        new one: its worker processes can't change what they read."""
        windows = PackedSequences(
            stream, position, seq_len, self.dp_rank, self.dp_world, self.labeler
        )
        return DataLoader(
            windows, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers
        )

    def _check_fits(self, seq_len: int, batch_size: int, remedy: str) -> None:
        """A batch of every rank must fit in one epoch, or no epoch could ever yield one."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        needed = self.dp_world * batch_size * (seq_len + 1)
        if needed > self.documents.num_tokens:
            more = "a larger data.val_fraction" if self.split == "val" else "more data"
            raise ValueError(
                f"the {self.split} split has {self.documents.num_tokens:,} tokens, fewer than "
                f"one batch needs: batch_size={batch_size} x dp_world={self.dp_world} x "
                f"(seq_len={seq_len} + 1) = {needed:,}; {remedy}, or {more}"
            )


def build_dataloader(
    prepared: PreparedData,
    split: str,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
    num_workers: int = 0,
) -> TokenLoader | MixtureLoader:
    """A loader over this rank's share of `split`; training data is reshuffled every epoch.
    A [[data.sources]] mixture reads in-process (its config check refuses workers)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    bos_id = prepared.tokenizer.bos_id
    if prepared.mixture:
        sources = {
            name: (source.weight, _documents(source.cache, split, bos_id))
            for name, source in prepared.mixture.items()
        }
        return MixtureLoader(sources, split, seq_len, batch_size, dp_rank, dp_world, seed)
    documents = _documents(prepared.cache, split, bos_id)
    labeler = answer_labels if prepared.chat else next_token_labels
    return TokenLoader(
        documents, split, seq_len, batch_size, dp_rank, dp_world, seed, num_workers, labeler
    )


def _documents(cache: TokenCache, split: str, bos_id: int) -> Documents:
    documents = Documents(cache.tokens(split), bos_id)
    if len(documents) != cache.num_docs[split]:
        raise RuntimeError(
            f"token cache {cache.root} holds {len(documents)} {split} documents, its "
            f"manifest says {cache.num_docs[split]}; delete the cache to rebuild it"
        )
    return documents
