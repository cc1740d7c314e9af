"""Write the built-in corpus (this Python's standard library source) as Parquet shards.

A fresh clone has no Parquet data; this makes some, so `train_configs/debug_parquet.toml`
trains the debug model through the `parquet` source exactly as it would on a web corpus:

    source scripts/env.sh && "$ARBOR_PYTHON" scripts/write_parquet_corpus.py
    ./run_train.sh train_configs/debug_parquet.toml

Columns: `text` (a file's source) and `name` (its path under the library).
"""

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbor_titan.data import Corpus, DataConfig  # noqa: E402


def write_shards(out: Path, shards: int, rows_per_group: int, max_files: int) -> list[Path]:
    """The stdlib's documents, dealt round-robin into `shards` files of row groups."""
    documents = list(Corpus(DataConfig(max_files=max_files, val_fraction=0.0)).documents())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        rows = documents[shard::shards]
        table = pa.table({"name": [n for n, _ in rows], "text": [t for _, t in rows]})
        path = out / f"stdlib-{shard:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/corpus/stdlib"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows-per-group", type=int, default=256)
    parser.add_argument("--max-files", type=int, default=0, help="first N stdlib files (0 = all)")
    args = parser.parse_args()
    paths = write_shards(args.out, args.shards, args.rows_per_group, args.max_files)
    size = sum(p.stat().st_size for p in paths) / 1e6
    print(f"wrote {len(paths)} Parquet shards ({size:.1f} MB) to {args.out}/")


if __name__ == "__main__":
    main()
