"""Documents from columnar files, read with pyarrow a record batch at a time.

`parquet`: Parquet shards, read in batches of rows of one row group, never a whole file.
`hf_disk`: the Arrow files of a Hugging Face `datasets.save_to_disk` folder (or Arrow files named
directly), memory-mapped and read one record batch at a time; `datasets` itself isn't needed.

A shard that can't be used (not Parquet/Arrow, no text column, a column that isn't text) is an
error naming the file, found when the corpus is opened (only file footers/schemas are read).
A null or empty value is a bad document: skipped and counted like the other sources' bad ones.
"""

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Rows converted to Python strings at a time: bounds memory on shards with huge row groups.
_ROWS_PER_BATCH = 1024
_TEXT_TYPES = (pa.string(), pa.large_string())


class MalformedShard(ValueError):
    """A corpus file that can't be read as the source says it is."""


def hf_disk_files(folder: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in the dataset's row order."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"data.paths: {folder.as_posix()!r} is a DatasetDict; point data.paths at one of its "
            f"splits: {', '.join(repr((folder / s).as_posix()) for s in splits)}"
        )
    state = folder / "state.json"
    if not state.is_file():
        raise FileNotFoundError(
            f"data.paths: {folder.as_posix()!r} is not a datasets.save_to_disk folder (it has no "
            "state.json); name its .arrow files instead"
        )
    try:
        files = [
            folder / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise MalformedShard(f"data.paths: {state.as_posix()} is unreadable: {err!r}") from None
    missing = [f.as_posix() for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"data.paths: {state.as_posix()} lists missing files {missing}")
    return files


def hub_name_error(pattern: str) -> ValueError:
    """The error for an hf_disk path that doesn't exist here, and may be a hub dataset's name."""
    return ValueError(
        f"data.paths: {pattern!r} is not a local folder or file. data.source = 'hf_disk' reads "
        "only what datasets.save_to_disk wrote (there is no hub access here): on a machine with "
        f"network, save it with `datasets.load_dataset(...).save_to_disk(FOLDER)` and copy "
        "FOLDER here, or use data.source = 'parquet' on the dataset's Parquet files"
    )


def check_shard(path: Path, source: str, field: str) -> None:
    """Raise MalformedShard, naming the file, unless it is a readable file of `source` whose
    `field` column holds text. Reads only the footer (Parquet) or schema (Arrow)."""
    try:
        schema = _parquet(path).schema_arrow if source == "parquet" else _arrow_schema(path)
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if source == "parquet" else "Arrow"
        raise MalformedShard(f"{path.as_posix()}: not a readable {kind} file ({err})") from None
    if field not in schema.names:
        raise MalformedShard(
            f"{path.as_posix()}: no column {field!r} (data.text_field); it has {schema.names}"
        )
    column_type = schema.field(field).type
    if column_type not in _TEXT_TYPES:
        raise MalformedShard(
            f"{path.as_posix()}: column {field!r} (data.text_field) is {column_type}, not text"
        )


def columnar_documents(
    name: str, path: Path, source: str, field: str, skipped: Counter
) -> Iterator[tuple[str, str]]:
    """`(f"{name}:{row}", text)` per row; a null or empty text is skipped and counted."""
    batches = _parquet_batches(path, field) if source == "parquet" else _arrow_batches(path, field)
    row = 0
    try:
        for column in batches:
            for text in column.to_pylist():
                if text is None:
                    skipped[f"null field {field!r}"] += 1
                elif not text:
                    skipped["empty"] += 1
                else:
                    yield f"{name}:{row}", text
                row += 1
    except pa.ArrowException as err:
        raise MalformedShard(f"{path.as_posix()}: unreadable at row {row} ({err})") from None


def _parquet(path: Path) -> pq.ParquetFile:
    return pq.ParquetFile(path, memory_map=True)


def _parquet_batches(path: Path, field: str) -> Iterator[pa.Array]:
    for batch in _parquet(path).iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field]):
        yield batch.column(0)


def _arrow_reader(path: Path) -> pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader:
    """`save_to_disk` writes the Arrow stream format; other tools often the file format."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _arrow_schema(path: Path) -> pa.Schema:
    return _arrow_reader(path).schema


def _arrow_batches(path: Path, field: str) -> Iterator[pa.Array]:
    reader = _arrow_reader(path)
    index = reader.schema.get_field_index(field)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    for batch in batches:
        for start in range(0, batch.num_rows, _ROWS_PER_BATCH):
            yield batch.column(index).slice(start, _ROWS_PER_BATCH)
