"""Pre-tokenization: each split as one flat token file `[BOS] doc [EOS] [BOS] doc [EOS] ...`.

Built once per (tokenizer, corpus) and memory-mapped afterwards. A JSON sidecar, written after
both token files, records dtype and counts; its presence means the cache is complete. A sidecar
or token file found damaged is rebuilt, with a warning: it is only a cache.

When the corpus has too few documents to hold whole ones out (`SplitPlan.by_tokens`), the val
file is the last `val_fraction` of the stream: the document it cuts into ends the train file
early and continues in the val file behind a BOS, so each file still starts with BOS.
"""

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arbor_titan.data.cache import atomic_path, cache_key, file_sha1
from arbor_titan.data.corpus import SPLITS, Corpus
from arbor_titan.data.progress import Progress
from arbor_titan.data.tokenizer import Tokenizer

_FORMAT = 2  # part of the cache key: bump when the file layout changes
_BATCH_CHARS = 4_000_000  # text handed to one multi-threaded encode call

Doc = tuple[str, str]

logger = logging.getLogger("arbor_titan")


class DamagedCache(Exception):
    """A sidecar or token file that doesn't describe a usable cache."""


@dataclass(frozen=True)
class TokenCache:
    """The token files of both splits and what the sidecar says about them."""

    paths: dict[str, Path]
    dtype: np.dtype
    num_tokens: dict[str, int]
    num_docs: dict[str, int]
    skipped: dict[str, int]
    val_by_tokens: bool = False  # val is the stream's tail (too few documents to hold any out)

    def tokens(self, split: str) -> np.ndarray:
        """A read-only memory map of one split's token stream."""
        if not self.num_tokens[split]:  # e.g. val with data.val_fraction = 0; mmap refuses it
            return np.zeros(0, self.dtype)
        return np.memmap(self.paths[split], dtype=self.dtype, mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def build_token_cache(
    tokenizer: Tokenizer,
    corpus: Corpus,
    cache_dir: Path,
    show_progress: bool,
    log: Callable[[str], None],
) -> TokenCache:
    """Load the token cache for this tokenizer and corpus, encoding the corpus first if needed."""
    specials = (tokenizer.bos_id, tokenizer.eos_id)  # a tokenizer.json's may be chosen by name
    key = cache_key(_FORMAT, file_sha1(tokenizer.path), specials, corpus.fingerprint)
    sidecar = Path(cache_dir) / f"tokens-{key}.json"
    paths = {split: sidecar.with_name(f"tokens-{key}-{split}.bin") for split in SPLITS}
    if sidecar.exists():
        try:
            cache = _read(sidecar, paths)
            log(f"reusing token cache {sidecar}")
            return cache
        except DamagedCache as err:
            logger.warning("token cache %s is damaged (%s); rebuilding it", sidecar, err)
    _encode(tokenizer, corpus, paths, sidecar, show_progress, log)
    return _read(sidecar, paths)


def _read(sidecar: Path, paths: dict[str, Path]) -> TokenCache:
    """The cache the sidecar describes, checked against the token files' sizes."""
    try:
        meta = json.loads(sidecar.read_bytes())
        cache = TokenCache(
            paths,
            np.dtype(meta["dtype"]),
            {split: int(meta["tokens"][split]) for split in SPLITS},
            {split: int(meta["docs"][split]) for split in SPLITS},
            dict(meta["skipped"]),
            bool(meta["val_by_tokens"]),
        )
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise DamagedCache(f"unreadable sidecar: {type(err).__name__}: {err}") from None
    for split, path in paths.items():
        expected = cache.num_tokens[split] * cache.dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes"
            raise DamagedCache(f"{path.name} is {found}, the sidecar says {expected:,} bytes")
    return cache


def _encode(
    tokenizer: Tokenizer,
    corpus: Corpus,
    paths: dict[str, Path],
    sidecar: Path,
    show_progress: bool,
    log: Callable[[str], None],
) -> None:
    plan = corpus.plan
    dtype = token_dtype(tokenizer.vocab_size)
    num_tokens = dict.fromkeys(SPLITS, 0)
    num_docs = dict(plan.num_docs)
    progress = Progress("tokenizing", sum(plan.num_docs.values()), show_progress)
    start = time.perf_counter()
    with ExitStack() as stack:  # unwinds in reverse: files close before they move into place
        tmp_paths = {split: stack.enter_context(atomic_path(p)) for split, p in paths.items()}
        files = {split: stack.enter_context(p.open("wb")) for split, p in tmp_paths.items()}
        for batch in _batches(corpus.documents(), _BATCH_CHARS):
            texts = [text for _, text in batch]
            for (name, _), ids in zip(batch, tokenizer.encode_batch(texts)):
                split = plan.split_of(name)
                files[split].write(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype))
                num_tokens[split] += len(ids) + 2
            progress.update(len(batch), sum(len(t.encode()) for t in texts))
        if plan.by_tokens:
            num_tokens, num_docs = _cut_tail(
                files, tmp_paths["train"], corpus.cfg.val_fraction, dtype, tokenizer.bos_id
            )
    progress.close()
    meta = {
        "dtype": dtype.name,
        "tokens": num_tokens,
        "docs": num_docs,
        "skipped": plan.skipped,
        "val_by_tokens": plan.by_tokens,
    }
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    log(
        f"tokenized {sum(plan.num_docs.values())} documents into {sidecar.parent} in "
        f"{time.perf_counter() - start:.1f}s"
    )


def _cut_tail(
    files: dict, train_path: Path, fraction: float, dtype: np.dtype, bos_id: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Move the last `fraction` of the train file's tokens into the val file (opened, empty), a
    BOS first when the cut falls inside a document; returns (tokens, documents) per split."""
    files["train"].flush()
    stream = np.memmap(train_path, dtype=dtype, mode="r")
    cut = len(stream) - round(len(stream) * fraction)
    docs = {"train": int(np.count_nonzero(stream[:cut] == bos_id))}
    tail = np.array(stream[cut:])  # a copy: the file shrinks below
    del stream
    if len(tail) and tail[0] != bos_id:
        tail = np.concatenate([np.array([bos_id], dtype), tail])
    docs["val"] = int(np.count_nonzero(tail == bos_id))
    files["val"].write(tail.tobytes())
    files["train"].truncate(cut * dtype.itemsize)
    return {"train": cut, "val": len(tail)}, docs


def _batches(documents: Iterable[Doc], max_chars: int) -> Iterator[list[Doc]]:
    """Consecutive documents grouped until a group holds `max_chars` characters."""
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
