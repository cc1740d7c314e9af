"""Pre-tokenization: each split as one token stream `[BOS] doc [EOS] [BOS] doc [EOS] ...`,
stored as numbered shard files that the loader memory-maps, plus a manifest.

A cache is a folder `tokens-<key>/` (the key names the tokenizer file, its BOS/EOS and the
corpus). Shard i holds a run of consecutive documents (see `shards`): its train documents'
tokens, then its val documents'. After each finished shard the manifest is rewritten (to a
temporary file, then renamed) listing the shards done so far, so a preparation that is killed
resumes at its first unfinished shard and ends with exactly the tokens of an uninterrupted one.
The finished manifest lists each split's pieces of shard files; its presence means the cache is
complete. A manifest or shard file found damaged is rebuilt (or resumed from), with a warning:
it is only a cache.

When the corpus has too few documents to hold whole ones out (`SplitPlan.by_tokens`), val is
the last `val_fraction` of the stream: the train split stops at the cut, and the tokens after it
are copied to `val-tail.bin`, behind a BOS when the cut falls inside a document, so each split
still starts with BOS.
"""

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arbor_titan.data.cache import atomic_path, cache_key, file_sha1
from arbor_titan.data.corpus import SPLITS, Corpus
from arbor_titan.data.progress import Progress
from arbor_titan.data.shards import (
    ShardRecord,
    available_cores,
    encode_shards,
    shard_jobs,
    shard_path,
)
from arbor_titan.data.token_stream import Piece, TokenStream
from arbor_titan.data.tokenizer import Tokenizer

_FORMAT = 3  # part of the cache key: bump when the file layout changes
_SINGLE_FILE_FORMAT = 2  # one token file per split and a JSON sidecar: no longer read
# Characters of text per shard: sets the memory bound (see docs/data.md) and how much work an
# interruption can lose (up to two shards per worker).
SHARD_CHARS = 16_000_000
_MANIFEST = "manifest.json"
_VAL_TAIL = "val-tail.bin"
_SCAN_TOKENS = 1 << 24  # tokens copied or counted at a time: bounds the by-tokens cut's memory

logger = logging.getLogger("arbor_titan")


class DamagedCache(Exception):
    """A manifest or token file that doesn't describe a usable cache."""


@dataclass(frozen=True)
class TokenCache:
    """The token files of both splits (in folder `root`) and what the manifest says of them."""

    root: Path
    pieces: dict[str, tuple[Piece, ...]]
    dtype: np.dtype
    num_tokens: dict[str, int]
    num_docs: dict[str, int]
    skipped: dict[str, int]
    val_by_tokens: bool = False  # val is the stream's tail (too few documents to hold any out)

    @classmethod
    def of_files(
        cls,
        paths: dict[str, Path],
        dtype: np.dtype,
        num_tokens: dict[str, int],
        num_docs: dict[str, int],
        skipped: dict[str, int],
    ) -> "TokenCache":
        """A cache of one whole token file per split (`num_tokens[split]` tokens each)."""
        pieces = {
            split: (Piece(path, 0, num_tokens[split]),) if num_tokens[split] else ()
            for split, path in paths.items()
        }
        root = Path(paths[SPLITS[0]]).parent
        return cls(root, pieces, np.dtype(dtype), num_tokens, num_docs, skipped)

    def tokens(self, split: str) -> TokenStream:
        """One split's token stream, memory-mapped piece by piece."""
        return TokenStream(self.pieces[split], self.dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def build_token_cache(
    tokenizer: Tokenizer,
    corpus: Corpus,
    cache_dir: Path,
    show_progress: bool,
    log: Callable[[str], None],
    workers: int = 0,
    shard_chars: int = SHARD_CHARS,
) -> TokenCache:
    """Load the token cache for this tokenizer and corpus, encoding the corpus first if needed
    (resuming an interrupted encoding) with `workers` processes (0: one per available core)."""
    specials = (tokenizer.bos_id, tokenizer.eos_id)  # a tokenizer.json's may be chosen by name
    identity = (file_sha1(tokenizer.path), specials, corpus.fingerprint)
    root = Path(cache_dir) / f"tokens-{cache_key(_FORMAT, *identity)}"
    dtype = token_dtype(tokenizer.vocab_size)
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("splits") is not None:
        try:
            cache = _cache(root, manifest)
            log(f"reusing token cache {root}")
            return cache
        except DamagedCache as err:
            logger.warning("token cache %s is damaged (%s); rebuilding it", root, err)
            manifest = None
    _mention_single_file_cache(Path(cache_dir), identity, log)
    done = _finished_shards(root, manifest, dtype, shard_chars)
    manifest = _encode(tokenizer, corpus, root, done, shard_chars, workers, show_progress, log)
    return _cache(root, manifest)


def _read_manifest(root: Path) -> dict | None:
    """The manifest as written, or None when there is none or it can't be read (a warning)."""
    path = root / _MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError(f"not a format-{_FORMAT} manifest")
        return manifest
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        logger.warning(
            "token cache %s is damaged (unreadable %s: %s); rebuilding it", root, path.name, err
        )
        return None


def _cache(root: Path, manifest: dict) -> TokenCache:
    """The finished cache the manifest describes, checked against its token files' sizes."""
    try:
        dtype = np.dtype(manifest["dtype"])
        _check_files(root, {name: int(n) for name, n in manifest["files"].items()}, dtype)
        splits = manifest["splits"]
        return TokenCache(
            root,
            {
                split: tuple(Piece(root / f, int(s), int(n)) for f, s, n in splits[split]["pieces"])
                for split in SPLITS
            },
            dtype,
            {split: int(splits[split]["tokens"]) for split in SPLITS},
            {split: int(splits[split]["docs"]) for split in SPLITS},
            dict(manifest["skipped"]),
            bool(manifest["val_by_tokens"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedCache(f"unreadable {_MANIFEST}: {type(err).__name__}: {err}") from None


def _check_files(root: Path, tokens_by_file: dict[str, int], dtype: np.dtype) -> None:
    for name, tokens in tokens_by_file.items():
        path = root / name
        expected = tokens * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes"
            raise DamagedCache(f"{name} is {found}, {_MANIFEST} says {expected:,} bytes")


def _finished_shards(
    root: Path, manifest: dict | None, dtype: np.dtype, shard_chars: int
) -> list[ShardRecord]:
    """The shards an interrupted preparation finished, up to the first damaged one; none when
    there was none, or it cut shards of another size or wrote another dtype."""
    if manifest is None:
        return []
    if manifest.get("dtype") != dtype.name or manifest.get("shard_chars") != shard_chars:
        return []
    done = []
    try:
        for index, fields in enumerate(manifest["shards"]):
            record = ShardRecord(**fields)
            _check_files(root, {shard_path(root, index).name: sum(record.tokens.values())}, dtype)
            done.append(record)
    except (DamagedCache, KeyError, TypeError, AttributeError) as err:
        logger.warning(
            "token cache %s: shard %d is damaged (%s); tokenizing again from there",
            root,
            len(done),
            err,
        )
    return done


def _mention_single_file_cache(
    cache_dir: Path, identity: tuple, log: Callable[[str], None]
) -> None:
    """Say so when this corpus was tokenized by an earlier version, in the old layout."""
    sidecar = cache_dir / f"tokens-{cache_key(_SINGLE_FILE_FORMAT, *identity)}.json"
    if sidecar.exists():
        log(
            f"{sidecar} is a token cache in the single-file layout of earlier versions; "
            f"tokenizing again into the sharded layout (its {sidecar.stem}* files can be deleted)"
        )


def _encode(
    tokenizer: Tokenizer,
    corpus: Corpus,
    root: Path,
    done: list[ShardRecord],
    shard_chars: int,
    workers: int,
    show_progress: bool,
    log: Callable[[str], None],
) -> dict:
    """Tokenize the shards after `done`, recording each in the manifest as it finishes, then
    write the finished manifest; returns it."""
    plan = corpus.plan
    dtype = token_dtype(tokenizer.vocab_size)
    total_docs = sum(plan.num_docs.values())
    skip = sum(record.documents for record in done)
    chars_left = plan.chars - sum(record.chars for record in done)
    # Spawning workers costs seconds: no more of them than there are shards left.
    workers = max(1, min(workers or available_cores(), math.ceil(chars_left / shard_chars)))
    if done:
        log(
            f"resuming the token cache {root} at shard {len(done)} ({skip:,} of {total_docs:,} "
            "documents were tokenized)"
        )
    log(
        f"tokenizing {total_docs - skip:,} documents ({chars_left / 1e6:,.1f}M characters) "
        f"with {workers} worker{'s' if workers > 1 else ''} into {root}"
    )
    progress = Progress("tokenizing", total_docs, plan.chars, show_progress)
    progress.add_done(skip, plan.chars - chars_left, sum(sum(r.tokens.values()) for r in done))
    start = time.perf_counter()
    documents = itertools.islice(corpus.documents(), skip, None)
    jobs = shard_jobs(documents, plan, shard_chars, len(done), root, dtype)
    for record in encode_shards(tokenizer, jobs, workers):
        done.append(record)
        _write_manifest(root, _progress_manifest(dtype, shard_chars, done))
        progress.update(record.documents, record.chars, record.nbytes, sum(record.tokens.values()))
    progress.close()
    manifest = _progress_manifest(dtype, shard_chars, done)
    if plan.by_tokens:
        manifest |= _cut_tail(root, done, dtype, corpus.cfg.val_fraction, tokenizer.bos_id)
    else:
        manifest |= _whole_document_splits(root, done)
    manifest["skipped"], manifest["val_by_tokens"] = dict(plan.skipped), plan.by_tokens
    _write_manifest(root, manifest)
    log(f"tokenized {total_docs:,} documents into {root} in {time.perf_counter() - start:.1f}s")
    return manifest


def _progress_manifest(dtype: np.dtype, shard_chars: int, done: list[ShardRecord]) -> dict:
    return {
        "format": _FORMAT,
        "dtype": dtype.name,
        "shard_chars": shard_chars,
        "shards": [asdict(record) for record in done],
        "files": _shard_files(done),
        "splits": None,  # None until every shard is done
    }


def _shard_files(done: list[ShardRecord]) -> dict[str, int]:
    """Tokens per shard file, by file name."""
    return {shard_path(Path(), i).name: sum(r.tokens.values()) for i, r in enumerate(done)}


def _write_manifest(root: Path, manifest: dict) -> None:
    with atomic_path(root / _MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def _whole_document_splits(root: Path, done: list[ShardRecord]) -> dict:
    """Each split's pieces: its part of every shard that has one."""
    splits = {}
    for split in SPLITS:
        pieces = []
        for index, record in enumerate(done):
            start = 0 if split == "train" else record.tokens["train"]
            if record.tokens[split]:
                pieces.append((shard_path(root, index).name, start, record.tokens[split]))
        splits[split] = {
            "pieces": pieces,
            "tokens": sum(r.tokens[split] for r in done),
            "docs": sum(r.docs[split] for r in done),
        }
    return {"splits": splits}


def _cut_tail(
    root: Path, done: list[ShardRecord], dtype: np.dtype, fraction: float, bos_id: int
) -> dict:
    """Train: the stream up to its last `fraction` of tokens; val: those, copied behind a BOS
    when the cut falls inside a document (all documents are train documents here)."""
    whole = _whole_document_splits(root, done)["splits"]["train"]
    stream = TokenStream(tuple(Piece(root / f, s, n) for f, s, n in whole["pieces"]), dtype)
    cut = len(stream) - round(len(stream) * fraction)
    train_pieces, position = [], 0
    for name, start, count in whole["pieces"]:
        if position < cut:
            train_pieces.append((name, start, min(count, cut - position)))
        position += count
    val_tokens, val_docs = 0, 0
    with atomic_path(root / _VAL_TAIL) as tmp, tmp.open("wb") as f:
        if cut < len(stream) and stream[cut] != bos_id:
            f.write(np.array([bos_id], dtype).tobytes())
            val_tokens, val_docs = 1, 1
        for begin in range(cut, len(stream), _SCAN_TOKENS):
            chunk = stream[begin : begin + _SCAN_TOKENS]
            f.write(np.ascontiguousarray(chunk).tobytes())
            val_tokens += len(chunk)
            val_docs += int(np.count_nonzero(chunk == bos_id))
    train_docs = sum(
        int(np.count_nonzero(stream[begin : min(cut, begin + _SCAN_TOKENS)] == bos_id))
        for begin in range(0, cut, _SCAN_TOKENS)
    )
    val_pieces = [(_VAL_TAIL, 0, val_tokens)] if val_tokens else []
    return {
        "files": {**_shard_files(done), _VAL_TAIL: val_tokens},
        "splits": {
            "train": {"pieces": train_pieces, "tokens": cut, "docs": train_docs},
            "val": {"pieces": val_pieces, "tokens": val_tokens, "docs": val_docs},
        },
    }
