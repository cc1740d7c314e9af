"""The `parquet` and `hf_disk` sources, on files made here with pyarrow."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arbor_titan.data import Corpus, DataConfig
from arbor_titan.data.columnar import MalformedShard

TEXTS = [f"document {i}\n" + "x" * (i % 7) for i in range(50)]


def corpus(source: str, *paths: Path | str, **kwargs) -> Corpus:
    return Corpus(DataConfig(source=source, paths=[str(p) for p in paths], **kwargs))


def write_parquet(path: Path, texts: list, rows_per_group: int = 8, column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": range(len(texts))}), path, rows_per_group)
    return path


def write_arrow_stream(path: Path, texts: list, rows_per_batch: int = 8) -> Path:
    """An Arrow file as datasets.save_to_disk writes one: the IPC stream format."""
    table = pa.table({"text": texts})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)
    return path


def save_to_disk_folder(folder: Path, shards: list[list[str]]) -> Path:
    """The layout of `datasets.Dataset.save_to_disk`: Arrow shards listed in state.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, texts in zip(names, shards):
        write_arrow_stream(folder / name, texts)
    state = {"_data_files": [{"filename": n} for n in names], "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_parquet_shards_read_in_order_across_row_groups(tmp_path):
    write_parquet(tmp_path / "b.parquet", TEXTS[25:])
    write_parquet(tmp_path / "a.parquet", TEXTS[:25])
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 4
    docs = list(corpus("parquet", tmp_path / "*.parquet", val_fraction=0.0).documents())
    assert [text for _, text in docs] == TEXTS
    assert docs[26][0] == f"{(tmp_path / 'b.parquet').as_posix()}:1"


def test_parquet_reads_one_batch_of_rows_at_a_time(tmp_path, monkeypatch):
    """Memory stays bounded: no call reads more than one batch of rows of a shard."""
    from arbor_titan.data import columnar

    monkeypatch.setattr(columnar, "_ROWS_PER_BATCH", 4)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", None)  # a whole-file read would fail loudly
    data = corpus("parquet", write_parquet(tmp_path / "a.parquet", TEXTS), val_fraction=0.0)
    assert data.plan.num_docs["train"] == len(TEXTS)  # the split pass; count the next alone
    sizes.clear()
    assert len(list(data.documents())) == len(TEXTS)
    assert max(sizes) == 4 and sum(sizes) == len(TEXTS)


def test_parquet_nulls_and_empty_rows_are_skipped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ["one", None, "", "two"])
    data = corpus("parquet", path, val_fraction=0.0)
    assert [text for _, text in data.documents()] == ["one", "two"]
    assert dict(data.plan.skipped) == {"null field 'text'": 1, "empty": 1}


def test_malformed_shards_are_named_together(tmp_path):
    write_parquet(tmp_path / "good.parquet", TEXTS)
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    write_parquet(tmp_path / "other_column.parquet", TEXTS, column="content")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(MalformedShard) as error:
        corpus("parquet", tmp_path / "*.parquet")
    message = str(error.value)
    assert "3 of 4 parquet files are malformed" in message
    assert "garbage.parquet: not a readable Parquet file" in message
    assert "other_column.parquet: no column 'text' (data.text_field)" in message
    assert "numbers.parquet: column 'text' (data.text_field) is int64, not text" in message
    assert "good.parquet" not in message


def test_truncated_parquet_shard_is_named(tmp_path):
    path = write_parquet(tmp_path / "cut.parquet", TEXTS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MalformedShard, match=r"cut\.parquet: not a readable Parquet file"):
        corpus("parquet", path)


def test_text_field_selects_the_column(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", TEXTS, column="content")
    docs = corpus("parquet", path, text_field="content", val_fraction=0.0).documents()
    assert [text for _, text in docs] == TEXTS


def test_hf_disk_folder_reads_its_shards_in_state_order(tmp_path):
    folder = save_to_disk_folder(tmp_path / "ds", [TEXTS[:30], TEXTS[30:]])
    data = corpus("hf_disk", folder, val_fraction=0.1)
    assert [text for _, text in data.documents()] == TEXTS
    train, val = (dict(data.documents(split)) for split in ("train", "val"))
    assert val and train.keys().isdisjoint(val) and len(train) + len(val) == len(TEXTS)
    assert data.plan.num_docs == {"train": len(train), "val": len(val)}


def test_hf_disk_reads_arrow_files_of_either_format(tmp_path):
    stream = write_arrow_stream(tmp_path / "a.arrow", TEXTS[:10])
    table = pa.table({"text": TEXTS[10:20]})
    with (
        pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    docs = corpus("hf_disk", stream, tmp_path / "b.arrow", val_fraction=0.0).documents()
    assert [text for _, text in docs] == TEXTS[:20]


def test_hf_disk_hub_name_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'HuggingFaceFW/fineweb' is not a local folder.*no hub"):
        corpus("hf_disk", "HuggingFaceFW/fineweb")


def test_hf_disk_dataset_dict_names_its_splits(tmp_path):
    folder = tmp_path / "dd"
    save_to_disk_folder(folder / "train", [TEXTS])
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"is a DatasetDict; point data.paths at .*dd/train'"):
        corpus("hf_disk", folder)


def test_hf_disk_folder_without_state_is_named(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a datasets.save_to_disk folder"):
        corpus("hf_disk", tmp_path / "plain")


def test_hf_disk_malformed_arrow_file_is_named(tmp_path):
    (tmp_path / "bad.arrow").write_bytes(b"\x00" * 64)
    with pytest.raises(MalformedShard, match=r"bad\.arrow: not a readable Arrow file"):
        corpus("hf_disk", tmp_path / "bad.arrow")


def test_shard_damaged_inside_its_data_is_named_when_read(tmp_path):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(200)]}), path, 50)
    data = bytearray(path.read_bytes())  # the footer stays intact: the shard opens
    third = len(data) // 3
    data[third : third + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedShard, match=r"damaged\.parquet: unreadable at row \d+"):
        list(corpus("parquet", path).documents())
