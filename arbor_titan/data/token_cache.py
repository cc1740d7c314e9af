"""Pre-tokenization: each split as one flat token file `[BOS] doc [EOS] [BOS] doc [EOS] ...`.

Built once per (tokenizer, corpus) and memory-mapped afterwards. A JSON sidecar, written after
both token files, records dtype and counts; its presence means the cache is complete.
"""

import json
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

_FORMAT = 1  # part of the cache key: bump when the file layout changes
_BATCH_CHARS = 4_000_000  # text handed to one multi-threaded encode call

Doc = tuple[str, str]


@dataclass(frozen=True)
class TokenCache:
    """The token files of both splits and what the sidecar says about them."""

    paths: dict[str, Path]
    dtype: np.dtype
    num_tokens: dict[str, int]
    num_docs: dict[str, int]
    skipped: dict[str, int]

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
    key = cache_key(_FORMAT, file_sha1(tokenizer.path), corpus.fingerprint)
    sidecar = Path(cache_dir) / f"tokens-{key}.json"
    paths = {split: sidecar.with_name(f"tokens-{key}-{split}.bin") for split in SPLITS}
    if sidecar.exists():
        log(f"reusing token cache {sidecar}")
    else:
        _encode(tokenizer, corpus, paths, sidecar, show_progress, log)
    meta = json.loads(sidecar.read_text())
    cache = TokenCache(
        paths, np.dtype(meta["dtype"]), meta["tokens"], meta["docs"], meta["skipped"]
    )
    for split, path in paths.items():
        if path.stat().st_size != cache.num_tokens[split] * cache.dtype.itemsize:
            raise RuntimeError(f"token cache {path} has the wrong size; delete it to rebuild")
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
    progress.close()
    meta = {
        "dtype": dtype.name,
        "tokens": num_tokens,
        "docs": plan.num_docs,
        "skipped": plan.skipped,
    }
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    log(
        f"tokenized {sum(plan.num_docs.values())} documents into {sidecar.parent} in "
        f"{time.perf_counter() - start:.1f}s"
    )


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
