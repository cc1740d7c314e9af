"""scripts/bench_context.py: each step's shape read off the context events, FLOPs that follow
the length, and a --quick run end to end (both arms trained, summary and plot written)."""

import importlib.util
import json

import pytest

from arbor_titan.config.cli import load_config
from tests.conftest import REPO, import_or_skip

spec = importlib.util.spec_from_file_location("bench_context", REPO / "scripts/bench_context.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def quick_configs():
    overrides = bench.arm_overrides(bench.parse_args(["--quick"]))
    return {name: load_config(bench.CONFIG, arm) for name, arm in overrides.items()}


def test_arms_differ_only_in_the_context_schedule():
    configs = quick_configs()
    constant, warmup = configs["constant"], configs["warmup"]
    assert constant.context.schedule == "constant" and warmup.context.schedule == "stages"
    assert warmup.context.keep_tokens_per_step
    for section in ("training", "optimizer", "lr_scheduler", "data", "tokenizer", "validation"):
        assert getattr(constant, section) == getattr(warmup, section), section


def test_shapes_follow_the_context_events():
    cfg = quick_configs()["warmup"]  # 6 steps at 128 x 2
    events = [
        {"event": "context", "step": 0, "seq_len": 64, "local_batch_size": 4},
        {"event": "context", "step": 2, "seq_len": 128, "local_batch_size": 2},
    ]
    assert bench.shapes_by_step(cfg, events) == [(64, 4)] * 2 + [(128, 2)] * 4
    # Same tokens per step, fewer FLOPs per token at the shorter length (the attention term).
    assert bench.flops_per_token_at(cfg, 64) < bench.flops_per_token_at(cfg, 128)


@pytest.mark.slow
def test_quick_run_writes_summary_and_plot(dump_folder, capsys):
    import_or_skip("matplotlib")
    # The session's dump folder: its small corpus and tokenizer are the --quick ones.
    assert bench.main(["--quick", f"--dump-folder={dump_folder}"]) == 0
    summary = json.loads((dump_folder / "bench_context.json").read_text())
    assert summary["constant"]["seq_lens"] == [128]
    assert summary["warmup"]["seq_lens"][0] == 64 and summary["warmup"]["seq_lens"][-1] == 128
    assert summary["warmup"]["total_flops"] < summary["constant"]["total_flops"]
    assert summary["constant"]["flops_to_target"] <= summary["constant"]["total_flops"]
    assert (dump_folder / "bench_context.png").read_bytes()[:4] == b"\x89PNG"
    assert "(constant / warmup, to the target loss)" in capsys.readouterr().out
