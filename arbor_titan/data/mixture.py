"""A weighted mixture of sources ([[data.sources]]): each window comes from one source, chosen
so that every source's share of the tokens read stays at its weight.

Each source keeps what a single-source loader keeps — its own epoch (reshuffled when its lanes
can't serve a batch) and `LanePosition` — plus the tokens read from it so far. The source of
each global window is a pure function of those counts: the window goes to the source furthest
below its share of all tokens read, the window itself counted (ties: the first source). Choices
are made one window at a time, so they depend on neither the batch size nor the data-parallel
layout, and a source's share never strays from its weight by more than about one window; the
counts are the checkpointed state, so a resume continues the same sequence exactly.
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from arbor_titan.data.dataset import Documents, EpochStream, epoch_stream
from arbor_titan.data.lanes import LanePosition

logger = logging.getLogger("arbor_titan")

Batch = tuple[torch.Tensor, torch.Tensor]

_SOURCE_KEYS = ("epoch", "split_tokens", "lane_length", "lane_offsets", "next_lane", "tokens")


def choose_sources(weights: list[float], tokens: list[int], windows: int, window: int) -> list[int]:
    """The source index of each of the next `windows` windows of `window` tokens, given the
    tokens read so far per source (`tokens` is updated)."""
    chosen = []
    for _ in range(windows):
        total = sum(tokens) + window
        source = max(range(len(weights)), key=lambda i: (weights[i] * total - tokens[i], -i))
        tokens[source] += window
        chosen.append(source)
    return chosen


@dataclass
class _Source:
    """One source's documents and where its reading stands."""

    name: str
    weight: float
    documents: Documents
    stream: EpochStream
    epoch: int = 0
    position: LanePosition | None = None  # None until its epoch's first window
    tokens: int = 0  # read so far, over all ranks and epochs


class MixtureLoader:
    """Yields `(inputs[B, S], labels[B, S])` int64 batches of one rank, mixing the sources.

    As `TokenLoader`: a batch of every rank takes the next `dp_world · batch_size` global
    windows of `seq_len + 1` tokens, rank r the windows r, r + W, ...; a source's windows come
    from far-apart lanes of its epoch's stream; `set_shape` changes the window length and batch
    from the next batch on. The train split shuffles each source's documents per epoch; val
    reads them in file order.
    """

    def __init__(
        self,
        sources: dict[str, tuple[float, Documents]],
        split: str,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_world: int,
        seed: int,
    ):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
        self.split, self.dp_rank, self.dp_world, self.seed = split, dp_rank, dp_world, seed
        self.shuffle = split == "train"
        self.sources = [
            _Source(name, weight, documents, self._epoch_stream(index, documents, 0))
            for index, (name, (weight, documents)) in enumerate(sources.items())
        ]
        self._check_fits(seq_len, batch_size, "use a smaller seq_len or local_batch_size")
        self.seq_len, self.batch_size = seq_len, batch_size

    @property
    def windows_per_batch(self) -> int:
        return self.dp_world * self.batch_size

    def token_counts(self) -> dict[str, int]:
        """Training tokens read from each source so far (all ranks together)."""
        return {source.name: source.tokens for source in self.sources}

    def set_shape(self, seq_len: int, batch_size: int) -> None:
        self._check_fits(seq_len, batch_size, "use a shorter seq_len or a smaller batch")
        self.seq_len, self.batch_size = seq_len, batch_size

    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> Batch:
        window = self.seq_len + 1
        tokens = [source.tokens for source in self.sources]
        weights = [source.weight for source in self.sources]
        chosen = choose_sources(weights, tokens, self.windows_per_batch, window)
        counts = np.bincount(chosen, minlength=len(self.sources))
        for index, (source, count) in enumerate(zip(self.sources, counts)):
            if count:
                self._make_room(index, source, int(count), window)
        batch = self._read(chosen, [s.position for s in self.sources], window)
        for source, count, read in zip(self.sources, counts, tokens):
            if count:
                source.position = source.position.advanced(int(count), window)
            source.tokens = read
        return batch

    def _make_room(self, index: int, source: _Source, count: int, window: int) -> None:
        """Start the source's epoch, or its next one when `count` windows don't fit its lanes."""
        if source.position is not None and source.position.windows_left(window) >= count:
            return
        if source.position is not None:
            if self.dp_rank == 0:
                logger.info(
                    "%s data: source %r epoch %d done; epoch %d starts, reshuffled",
                    self.split,
                    source.name,
                    source.epoch,
                    source.epoch + 1,
                )
            source.epoch += 1
            source.stream = self._epoch_stream(index, source.documents, source.epoch)
        source.position = LanePosition.start(
            source.documents.num_tokens, window, self.windows_per_batch
        )

    def _read(
        self, chosen: list[int], positions: list[LanePosition], window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a batch whose global window m comes from source `chosen[m]`."""
        nth = []  # window m is its source's nth window of the batch
        seen = [0] * len(self.sources)
        for source in chosen:
            nth.append(seen[source])
            seen[source] += 1
        rows = []
        for m in range(self.dp_rank, len(chosen), self.dp_world):
            source = self.sources[chosen[m]]
            start = positions[chosen[m]].window_start(nth[m], window)
            rows.append(torch.from_numpy(source.stream.read(start, window)))
        tokens = torch.stack(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def val_batches(
        self, max_batches: int, seq_len: int | None = None, source: str | None = None
    ) -> Iterator[Batch]:
        """The first `max_batches` batches of the mixture — or of `source` alone — in file
        order: the same every call. Ends early when a source's val split runs out."""
        if self.split != "val":
            raise ValueError(f"val_batches() needs a 'val' loader, this one reads {self.split!r}")
        seq_len = self.seq_len if seq_len is None else seq_len
        window = seq_len + 1
        weights = [float(s.name == source) if source else s.weight for s in self.sources]
        if source is not None and source not in self.token_counts():
            raise ValueError(f"no source {source!r}; the sources are {list(self.token_counts())}")
        positions = [LanePosition(s.documents.num_tokens, (0,)) for s in self.sources]
        tokens = [0] * len(self.sources)
        for _ in range(max_batches):
            chosen = choose_sources(weights, tokens, self.windows_per_batch, window)
            counts = np.bincount(chosen, minlength=len(self.sources))
            if any(p.windows_left(window) < c for p, c in zip(positions, counts)):
                return
            yield self._read(chosen, positions, window)
            positions = [p.advanced(int(c), window) for p, c in zip(positions, counts)]

    def state_dict(self) -> dict:
        """Per source: its epoch, lanes and tokens read; and the shape (see `TokenLoader`)."""
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "dp_world": self.dp_world,
            "sources": {source.name: self._source_state(source) for source in self.sources},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume every source where it stood, on any data-parallel layout."""
        saved = state["sources"]
        if list(saved) != [s.name for s in self.sources]:
            raise ValueError(
                f"the checkpoint's data mixture has sources {list(saved)}, data.sources has "
                f"{[s.name for s in self.sources]}"
            )
        for index, source in enumerate(self.sources):
            self._load_source(index, source, saved[source.name])
        same_layout = int(state["dp_world"]) == self.dp_world
        batch_size = int(state["batch_size"]) if same_layout else self.batch_size
        self.set_shape(int(state["seq_len"]), batch_size)

    def check_state_keys(self, keys: Iterable[str]) -> None:
        """Refuse a saved state that is not this mixture's before anything is read into it."""
        saved = list(keys)
        wanted = ["seq_len", "batch_size", "dp_world"] + [
            f"sources.{s.name}.{key}" for s in self.sources for key in _SOURCE_KEYS
        ]
        missing = [w for w in wanted if not any(k == w or k.startswith(f"{w}.") for k in saved)]
        if missing:
            raise ValueError(
                f"the data loader state lacks {', '.join(missing[:6])}: it was not saved by a run "
                f"mixing the sources {[s.name for s in self.sources]} (data.sources); start a "
                "new run from its weights with checkpoint.initial_load_path"
            )

    @staticmethod
    def _source_state(source: _Source) -> dict:
        position = source.position or LanePosition(0, ())
        return {
            "epoch": source.epoch,
            "split_tokens": source.documents.num_tokens,
            "lane_length": position.lane_length,
            "lane_offsets": list(position.offsets),
            "next_lane": position.next_lane,
            "tokens": source.tokens,
        }

    def _load_source(self, index: int, source: _Source, state: dict) -> None:
        if int(state["split_tokens"]) != source.documents.num_tokens:
            raise ValueError(
                f"the saved position of data source {source.name!r} is in a {self.split} split "
                f"of {int(state['split_tokens']):,} tokens, this one has "
                f"{source.documents.num_tokens:,}: its settings or files changed since"
            )
        offsets = tuple(int(offset) for offset in state["lane_offsets"])
        epoch = int(state["epoch"])
        if epoch != source.epoch:
            source.stream = self._epoch_stream(index, source.documents, epoch)
        source.epoch, source.tokens = epoch, int(state["tokens"])
        source.position = None
        if offsets:
            source.position = LanePosition(
                int(state["lane_length"]), offsets, int(state["next_lane"])
            )

    def _epoch_stream(self, index: int, documents: Documents, epoch: int) -> EpochStream:
        return epoch_stream(documents, [self.seed, index, epoch] if self.shuffle else None)

    def _check_fits(self, seq_len: int, batch_size: int, remedy: str) -> None:
        """A whole batch must fit in every source's split, or some batch could never be read."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        needed = self.dp_world * batch_size * (seq_len + 1)
        for source in self.sources:
            if needed > source.documents.num_tokens:
                raise ValueError(
                    f"the {self.split} split of data source {source.name!r} has "
                    f"{source.documents.num_tokens:,} tokens, fewer than one batch needs "
                    f"({needed:,}); {remedy}, or give it more data"
                )
