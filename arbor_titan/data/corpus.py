"""Corpus sources: the documents `(name, text)` that `[data]` describes, and their train/val split.

Documents come in a deterministic order. Bad ones (invalid UTF-8 or JSON, a missing field, no
text) are skipped and counted, and the counts are reported, so a broken corpus never turns
silently into a small or empty run.

The split holds out whole documents, chosen by a stable hash of their names, when the corpus has
enough of them: `val_fraction` of the documents is at least one. A corpus of a few large files
can't be split that way (one file out of two is half the data; out of one, nothing), so there
the validation split is the last `val_fraction` of the token stream instead (`SplitPlan.by_tokens`;
the token cache cuts it, and the tokenizer trains on the whole text, that tail included).
"""

import glob
import hashlib
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from arbor_titan.data.columnar import (
    MalformedShard,
    check_shard,
    columnar_documents,
    hf_disk_files,
    hub_name_error,
)
from arbor_titan.data.config import DataConfig, check_data_config

SPLITS = ("train", "val")
_EXCLUDED_DIRS = {"site-packages", "dist-packages"}
_COLUMNAR = ("parquet", "hf_disk")


def unit_hash(name: str) -> float:
    """A stable number in [0, 1) per document name: the split never depends on other documents."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitPlan:
    """The result of one pass over the corpus: which valid documents are held out, and counts."""

    val_names: frozenset[str]
    num_docs: dict[str, int]
    skipped: Counter
    by_tokens: bool = False  # too few documents: val is the stream's last val_fraction of tokens
    chars: int = 0  # in all valid documents: the work a tokenizing pass has ahead

    def split_of(self, name: str) -> str:
        return "val" if name in self.val_names else "train"


class Corpus:
    """The files that `[data]` names, read as documents and split into train and val."""

    def __init__(self, cfg: DataConfig):
        check_data_config(cfg)
        self.cfg = cfg
        self.files = _resolve_files(cfg)
        if not self.files:
            raise ValueError(f"data.source = {cfg.source!r} found no files: the corpus is empty")
        if cfg.source in _COLUMNAR:
            _check_shards(self.files, cfg.source, cfg.text_field)

    @cached_property
    def fingerprint(self) -> str:
        """Names the corpus and its split by file names, sizes and mtimes, without reading them."""
        h = hashlib.sha1(
            repr((self.cfg.source, self.cfg.text_field, self.cfg.val_fraction)).encode()
        )
        for name, path in self.files:
            stat = path.stat()
            h.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @cached_property
    def plan(self) -> SplitPlan:
        """Read the corpus once to assign splits; raise if no document survives."""
        skipped: Counter = Counter()
        val: set[str] = set()
        count, chars, lowest, highest = 0, 0, (1.0, ""), (-1.0, "")
        for name, text in self._read(skipped):
            key = (unit_hash(name), name)
            count += 1
            chars += len(text)
            lowest, highest = min(lowest, key), max(highest, key)
            if key[0] < self.cfg.val_fraction:
                val.add(name)
        if not count:
            raise ValueError(f"no usable documents in the corpus: {describe_skips(skipped)}")
        if 0 < count * self.cfg.val_fraction < 1:
            no_val = {"train": count, "val": 0}
            return SplitPlan(frozenset(), no_val, skipped, by_tokens=True, chars=chars)
        # The hash may still pick no document, or all: keep one in each split.
        if not val and self.cfg.val_fraction > 0:
            val.add(lowest[1])
        if len(val) == count:
            val.discard(highest[1])
        num_docs = {"train": count - len(val), "val": len(val)}
        return SplitPlan(frozenset(val), num_docs, skipped, chars=chars)

    def documents(self, split: str | None = None) -> Iterator[tuple[str, str]]:
        """Valid documents in order; only those of `split` ("train" | "val") when given."""
        plan = self.plan
        for name, text in self._read(Counter()):
            if split is None or plan.split_of(name) == split:
                yield name, text

    def _read(self, skipped: Counter) -> Iterator[tuple[str, str]]:
        for name, path in self.files:
            if self.cfg.source == "jsonl":
                yield from _jsonl_documents(name, path, self.cfg.text_field, skipped)
            elif self.cfg.source in _COLUMNAR:
                yield from columnar_documents(
                    name, path, self.cfg.source, self.cfg.text_field, skipped
                )
            else:
                yield from _checked(name, _decode(path.read_bytes(), skipped), skipped)


class MixedCorpus:
    """A mixture's sources read one after another, unweighted: what its tokenizer trains on."""

    def __init__(self, corpora: list[Corpus]):
        self.corpora = corpora

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha1("\0".join(c.fingerprint for c in self.corpora).encode()).hexdigest()[
            :16
        ]

    def documents(self, split: str | None = None) -> Iterator[tuple[str, str]]:
        for corpus in self.corpora:
            yield from corpus.documents(split)


def describe_skips(skipped: Mapping[str, int]) -> str:
    """A one-line summary such as 'skipped 3 documents: 2 invalid UTF-8, 1 missing field 'text''."""
    total = sum(skipped.values())
    if not total:
        return "skipped no documents"
    reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(skipped).most_common())
    return f"skipped {total} document{'s' if total > 1 else ''}: {reasons}"


def _resolve_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """(document name, path) per file, sorted by name, cut to `max_files`."""
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        relative = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
        files = {r.as_posix(): root / r for r in relative if _EXCLUDED_DIRS.isdisjoint(r.parts)}
    else:
        files = {}
        for pattern in cfg.paths:
            for path in _expand(pattern, cfg.source):
                files[path.as_posix()] = path
    names = sorted(files)
    if cfg.max_files:
        names = names[: cfg.max_files]
    return [(name, files[name]) for name in names]


def _expand(pattern: str, source: str) -> list[Path]:
    if glob.has_magic(pattern):
        matches = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise FileNotFoundError(f"data.paths: glob {pattern!r} matches no files")
        return matches
    path = Path(pattern)
    if source == "hf_disk" and path.is_dir():
        return hf_disk_files(path)
    if source == "hf_disk" and not path.exists():
        raise hub_name_error(pattern)
    if path.is_dir():
        raise ValueError(
            f"data.paths: {pattern!r} is a directory; use a glob like '{pattern}/**/*'"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data.paths: no such file {pattern!r}")
    return [path]


def _check_shards(files: list[tuple[str, Path]], source: str, field: str) -> None:
    """One error naming every file of a columnar source that can't be read as text rows."""
    problems = []
    for _, path in files:
        try:
            check_shard(path, source, field)
        except MalformedShard as err:
            problems.append(str(err))
    if problems:
        listed = "\n  ".join(problems)
        raise MalformedShard(
            f"data.paths: {len(problems)} of {len(files)} {source} files are malformed:\n  {listed}"
        )


def _decode(raw: bytes, skipped: Counter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["invalid UTF-8"] += 1
        return None


def _checked(name: str, text: str | None, skipped: Counter) -> Iterator[tuple[str, str]]:
    if text == "":
        skipped["empty"] += 1
    elif text is not None:
        yield name, text


def _jsonl_documents(
    name: str, path: Path, field: str, skipped: Counter
) -> Iterator[tuple[str, str]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, skipped)
            if line is None or not line.strip():  # blank lines separate nothing: not documents
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid JSON"] += 1
                continue
            if not isinstance(obj, dict) or field not in obj:
                skipped[f"missing field {field!r}"] += 1
            elif not isinstance(obj[field], str):
                skipped[f"non-string field {field!r}"] += 1
            else:
                yield from _checked(f"{name}:{lineno}", obj[field], skipped)
