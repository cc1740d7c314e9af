"""scripts/bench_data.py --quick end to end: a small corpus tokenized with 1 and 2 workers into
the same tokens, both tokenizer trainers timed, the loader against the training step."""

import importlib.util
import json

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts/bench_data.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_quick_run_measures_every_part(tmp_path, capsys):
    results = bench.main(["--quick", "--out", str(tmp_path)])
    serial, parallel = results["tokenize"]
    assert (serial["workers"], parallel["workers"]) == (1, 2)
    assert serial["tokens"] == parallel["tokens"] > 0 and serial["shards"] >= 4
    assert serial["text_bytes"] == results["corpus"]["text_bytes"] >= 2e6
    assert parallel["worker_peak_rss_mb"] > 0 and serial["peak_rss_mb"] > 0
    for trainer in ("sentencepiece", "tokenizers"):
        assert 1 < results["tokenizer_training"][trainer]["bytes_per_token"] < 10
    loader = results["loader"]
    assert loader["loader_tokens_per_s"] > loader["step_tokens_per_s"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == results
    table = capsys.readouterr().out
    assert "| tokenize into the cache, 2 workers | " in table and "MB/s" in table
    assert "x faster" in table
