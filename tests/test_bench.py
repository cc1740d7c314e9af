"""arbor_titan.bench: a run's metrics.jsonl read back, and where a curve reaches a target."""

import json

import pytest

from arbor_titan.bench import RunMetrics, first_reach


def test_first_reach_interpolates_between_evaluations():
    curve = [(0.0, 8.0), (10.0, 6.0), (20.0, 5.0)]
    assert first_reach(curve, 8.0) == 0.0
    assert first_reach(curve, 5.5) == pytest.approx(15.0)
    assert first_reach(curve, 4.9) is None


def test_run_metrics_sorts_steps_validation_and_events(tmp_path):
    records = [
        {"event": "context", "step": 0, "seq_len": 64},
        {"step": 1, "loss": 7.5, "lr": 1e-3},
        {"step": 2, "loss": 7.0, "lr": 1e-3},
        {"step": 2, "val_loss": 7.2},
        {"event": "growth", "step": 2, "op": "deepen"},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    run = RunMetrics.read(tmp_path)
    assert run.train == [(1, 7.5), (2, 7.0)]
    assert run.val == [(2, 7.2)]
    assert [e["step"] for e in run.events_of("context")] == [0]
    assert [e["op"] for e in run.events_of("growth")] == ["deepen"]
