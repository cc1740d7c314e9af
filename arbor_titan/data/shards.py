"""Tokenizing a corpus a shard at a time, in parallel worker processes.

A shard is a run of consecutive documents holding at least `shard_chars` characters (the last
one less; a document longer than that is a shard alone). Its boundaries depend only on the
documents, and each shard is tokenized into its own file by whichever process gets it, so the
files are the same for any number of workers. Results come back in shard order with at most
two shards per worker in flight: memory depends on the shard size, never on the corpus size.

Workers are spawned (not forked: the parent may hold threads and a torch runtime) and each
loads the tokenizer from its file once; a tokenizer pickles as its path for that.
"""

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arbor_titan.data.cache import atomic_path
from arbor_titan.data.corpus import SPLITS, SplitPlan
from arbor_titan.data.tokenizer import Tokenizer

# Shards submitted per worker before the oldest result is waited for: one being tokenized,
# one queued so that no worker idles while the parent reads the next shard's documents.
_IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class ShardJob:
    """The documents of shard `index` (`splits[i]` is text i's split) and its token file."""

    index: int
    path: Path
    texts: list[str]
    splits: list[str]
    dtype: np.dtype


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest keeps of a finished shard: its file holds `tokens["train"]` train
    tokens, then `tokens["val"]` val tokens, `docs[split]` documents each."""

    tokens: dict[str, int]
    docs: dict[str, int]
    chars: int
    nbytes: int  # UTF-8 bytes of its text

    @property
    def documents(self) -> int:
        return sum(self.docs.values())


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def shard_jobs(
    documents: Iterable[tuple[str, str]],
    plan: SplitPlan,
    shard_chars: int,
    first: int,
    directory: Path,
    dtype: np.dtype,
) -> Iterator[ShardJob]:
    """`documents` grouped into shards numbered from `first`, each of >= `shard_chars`
    characters but the last."""
    texts: list[str] = []
    splits: list[str] = []
    chars, index = 0, first
    for name, text in documents:
        texts.append(text)
        splits.append(plan.split_of(name))
        chars += len(text)
        if chars >= shard_chars:
            yield ShardJob(index, shard_path(directory, index), texts, splits, dtype)
            texts, splits, chars, index = [], [], 0, index + 1
    if texts:
        yield ShardJob(index, shard_path(directory, index), texts, splits, dtype)


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.bin"


def encode_shard(tokenizer: Tokenizer, job: ShardJob) -> ShardRecord:
    """Tokenize a shard's documents as `[BOS] doc [EOS]` each and write its file: the train
    documents, then the val ones, in corpus order."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    nbytes = 0
    for text, split in zip(job.texts, job.splits):
        ids = tokenizer.encode(text)
        doc = np.empty(len(ids) + 2, job.dtype)
        doc[0], doc[1:-1], doc[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
        parts[split].append(doc)
        nbytes += len(text.encode())
    with atomic_path(job.path) as tmp, tmp.open("wb") as f:
        for split in SPLITS:
            for doc in parts[split]:
                f.write(doc)
    return ShardRecord(
        tokens={split: sum(len(doc) for doc in parts[split]) for split in SPLITS},
        docs={split: len(parts[split]) for split in SPLITS},
        chars=sum(len(text) for text in job.texts),
        nbytes=nbytes,
    )


def encode_shards(
    tokenizer: Tokenizer, jobs: Iterable[ShardJob], workers: int
) -> Iterator[ShardRecord]:
    """Each job's record, in job order: in this process for one worker, else in `workers`
    spawned processes. Closing the iterator cancels the shards not yet started."""
    if workers == 1:
        for job in jobs:
            yield encode_shard(tokenizer, job)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load_worker_tokenizer,
        initargs=(tokenizer,),
    )
    try:
        pending: deque[Future] = deque()
        for job in jobs:
            pending.append(pool.submit(_encode_in_worker, job))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# A worker process's tokenizer, loaded once by the pool's initializer.
_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(job: ShardJob) -> ShardRecord:
    return encode_shard(_worker_tokenizer, job)
