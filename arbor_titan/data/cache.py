"""Content-addressed cache files: stable keys, and writes that are all-or-nothing.

Every cache file is written under a temporary name and moved into place with `os.replace`, so a
crash (or a second process building the same file) never leaves a half-written file under the
final name. Callers treat "the final file exists" as "it is complete".
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


def cache_key(*parts: object) -> str:
    """A short hex key for JSON-serializable `parts` (settings, fingerprints, file hashes)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_sha1(path: Path) -> str:
    """The hex SHA-1 of a file's bytes, read in blocks."""
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success move it to `final`, else delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
