"""A non-finite loss skips its step's update; too many in a row stop the run cleanly."""

import json
import sys
from pathlib import Path

import pytest
import torch

from arbor_titan.checkpoint.convert import DcpWeights
from arbor_titan.health import NonFiniteError, NonFiniteGuard
from arbor_titan.metrics.config import MetricsConfig
from arbor_titan.metrics.logger import MetricLogger
from tests.conftest import losses, run_training

FAULT = [sys.executable, str(Path(__file__).with_name("fault_train.py"))]


def skip_events(run_dir: Path) -> list[tuple[int, int]]:
    """(step, in_a_row) of every skipped step in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], r["in_a_row"]) for r in records if r.get("event") == "nonfinite_step_skipped"
    ]


def test_guard_counts_in_a_row_and_stops_past_the_limit(tmp_path):
    metrics = MetricLogger(MetricsConfig(enable_tensorboard=False), tmp_path, enabled=True)
    guard = NonFiniteGuard(limit=1, metrics=metrics)
    finite, nan, inf = torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert guard.allows_update(1, finite, finite)
    assert not guard.allows_update(2, nan, finite)
    assert guard.allows_update(3, finite, finite)  # a finite step resets the count
    assert not guard.allows_update(4, finite, inf)
    with pytest.raises(NonFiniteError, match="training.nonfinite_skip_limit=1"):
        guard.allows_update(5, nan, nan)
    metrics.close()
    assert skip_events(tmp_path) == [(2, 1), (4, 1), (5, 2)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    saved = DcpWeights(folder)
    return {name: saved.load(name) for name in saved.names}


def test_nonfinite_steps_are_skipped_then_the_run_stops(dump_folder):
    # Step 3 is skipped alone; 5 and 6 are skipped in a row; 7 is one too many (limit 2).
    result = run_training(
        dump_folder,
        "nonfinite",
        "--training.steps=8",
        "--checkpoint.interval=2",
        "--training.nonfinite_skip_limit=2",
        script=[*FAULT, "--nonfinite-steps", "3,5,6,7"],
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: training stopped at step 7: 3 steps in a row" in result.stderr
    run = dump_folder / "nonfinite"
    assert skip_events(run) == [(3, 1), (5, 1), (6, 2), (7, 3)]
    assert all(
        torch.isfinite(torch.tensor(v))
        for s, v in losses(dump_folder, "nonfinite").items()
        if s in (1, 2, 4)
    )
    # No save after the stop; the checkpoint of step 6 holds step 4's weights (5 and 6 skipped).
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == ["step-2", "step-4", "step-6"]
    at_4, at_6 = weights(run / "checkpoints" / "step-4"), weights(run / "checkpoints" / "step-6")
    assert all(torch.isfinite(t).all() for t in at_6.values())
    assert all(torch.equal(at_4[name], at_6[name]) for name in at_4)
    # Step 3 was skipped but step 4 trained: step 4 changed the weights of step 2.
    at_2 = weights(run / "checkpoints" / "step-2")
    assert any(not torch.equal(at_2[name], at_4[name]) for name in at_2)
