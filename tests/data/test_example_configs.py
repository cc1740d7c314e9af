"""The README's data examples end to end: scripts/write_parquet_corpus.py's shards train the
debug model through train_configs/debug_parquet.toml, and train_configs/debug_mixture.toml mixes
them with the stdlib, counting each source's tokens across a resume and validating each."""

import importlib.util
import json
from pathlib import Path

import pytest

from arbor_titan.data.mixture import choose_sources
from tests.conftest import REPO, run_training, step_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location(
        "write_parquet_corpus", REPO / "scripts" / "write_parquet_corpus.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = tmp_path_factory.mktemp("parquet")
    shards = script.write_shards(folder, 2, 16, max_files=60)
    assert [p.name for p in shards] == [
        "stdlib-00000-of-00002.parquet",
        "stdlib-00001-of-00002.parquet",
    ]
    return folder


def test_debug_parquet_config_trains_on_written_shards(parquet_shards, dump_folder):
    run_training(
        dump_folder,
        "parquet",
        f"--data.paths=['{parquet_shards.as_posix()}/*.parquet']",
        "--training.steps=2",
        config="debug_parquet.toml",
    )
    metrics = step_metrics(dump_folder, "parquet")
    assert sorted(metrics) == [1, 2]
    assert all(record["loss"] > 0 for record in metrics.values())


def test_debug_mixture_counts_sources_across_a_resume(parquet_shards, dump_folder, tmp_path):
    config = tmp_path / "mixture.toml"  # the shipped mixture, its Parquet source moved here
    config.write_text(
        f'extends = "{(REPO / "train_configs" / "debug_mixture.toml").as_posix()}"\n\n'
        '[[data.sources]]\nname = "parquet"\nweight = 0.7\nsource = "parquet"\n'
        f'paths = ["{parquet_shards.as_posix()}/*.parquet"]\n\n'
        '[[data.sources]]\nname = "stdlib"\nweight = 0.3\nsource = "stdlib"\n'
    )
    run = ["--checkpoint.interval=2"]
    run_training(dump_folder, "mixture", *run, "--training.steps=2", config=str(config))
    resumed = run_training(
        dump_folder,
        "mixture",
        *run,
        "--training.steps=3",
        "--validation.enable=true",
        "--validation.steps=1",
        config=str(config),
    )
    assert "resumed from" in resumed.stdout + resumed.stderr
    records = step_metrics(dump_folder, "mixture")
    window, windows = 64 + 1, 4  # FAST_TRAINING: seq 64, batch 4
    expected = [0, 0]
    for step in (1, 2, 3):
        choose_sources([0.7, 0.3], expected, windows, window)
        counts = [records[step]["tokens_seen/parquet"], records[step]["tokens_seen/stdlib"]]
        assert counts == expected, step
    lines = (dump_folder / "mixture" / "metrics.jsonl").read_text().splitlines()
    validation = [json.loads(line) for line in lines if '"val_loss"' in line]
    assert validation[-1]["step"] == 3
    assert {"val_loss", "val_loss/parquet", "val_loss/stdlib"} <= set(validation[-1])
