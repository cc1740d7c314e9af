"""MetricLogger: stable TensorBoard tags, JSONL lines, events, text, and silent ranks."""

import json
import logging

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from arbor_titan.metrics import MetricLogger, MetricsConfig
from arbor_titan.metrics.logger import format_step

STEP = {
    "loss": 5.1234,
    "lr": 8e-4,
    "grad_norm": 1.234,
    "tokens_per_second": 12345.0,
    "mfu": 0.312,
    "memory_gib": 1.23,
}


def _log_run(run_dir, enabled=True, **cfg) -> None:
    logger = MetricLogger(MetricsConfig(**cfg), run_dir, enabled=enabled)
    logger.log_text("config", '[job]\nname = "debug"')
    logger.log_step(10, STEP)
    logger.log_step(20, {**STEP, "loss": 4.5, "aux_loss": 0.25})
    logger.log_step(20, {"val_loss": 4.75})
    logger.log_event(15, "growth", {"width": 512, "operator": "net2net", "exact": True})
    logger.close()


def _tensorboard(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return events


def test_console_line():
    assert format_step(20, {**STEP, "aux_loss": 0.25}) == (
        "step   20 | loss 5.1234 | lr 8.00e-04 | grad_norm 1.234 | tok/s 12,345 | mfu 31.2% "
        "| mem 1.23 GiB | aux_loss 0.25"
    )


def test_scalars_read_back_under_stable_tags(tmp_path):
    _log_run(tmp_path)
    events = _tensorboard(tmp_path)
    expected = {
        "loss/train": [(10, 5.1234), (20, 4.5)],
        "loss/val": [(20, 4.75)],
        "optim/lr": [(10, 8e-4), (20, 8e-4)],
        "optim/grad_norm": [(10, 1.234), (20, 1.234)],
        "throughput/tokens_per_second": [(10, 12345.0), (20, 12345.0)],
        "throughput/mfu": [(10, 0.312), (20, 0.312)],
        "memory/gib": [(10, 1.23), (20, 1.23)],
        "misc/aux_loss": [(20, 0.25)],
        "events/growth/width": [(15, 512.0)],
    }
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in points]
        for (_, got), (_, want) in zip(read, points):
            assert abs(got - want) <= 1e-6 * max(1.0, abs(want))  # stored as float32


def test_text_for_config_and_events(tmp_path):
    _log_run(tmp_path)
    events = _tensorboard(tmp_path)
    # SummaryWriter.add_text files text under "<tag>/text_summary".
    assert {"config/text_summary", "events/growth/text_summary"} <= set(events.Tags()["tensors"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert config == '```\n[job]\nname = "debug"\n```'
    growth = events.Tensors("events/growth/text_summary")[0]
    assert growth.step == 15
    assert "- operator: net2net" in growth.tensor_proto.string_val[0].decode()


def test_jsonl_has_one_object_per_call_and_appends(tmp_path):
    _log_run(tmp_path)
    _log_run(tmp_path)  # a resumed run continues the file
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8
    assert records[0] == {"step": 10, **STEP}
    assert records[1]["aux_loss"] == 0.25
    assert records[2] == {"step": 20, "val_loss": 4.75}
    assert records[3] == {
        "event": "growth",
        "step": 15,
        "width": 512,
        "operator": "net2net",
        "exact": True,
    }


def test_jsonl_is_flushed_before_close(tmp_path):
    logger = MetricLogger(MetricsConfig(), tmp_path, enabled=True)
    logger.log_step(1, {"loss": 3.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 3.0}
    logger.close()


def test_disabled_rank_writes_nothing_but_still_logs_to_console(tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="arbor_titan"):
        _log_run(run_dir, enabled=False)
    assert not run_dir.exists()
    assert "step   10 | loss 5.1234" in caplog.text
    assert "event growth at step 15 | width 512 | operator net2net | exact True" in caplog.text


def test_each_sink_can_be_switched_off(tmp_path):
    _log_run(tmp_path / "no_tb", enable_tensorboard=False)
    _log_run(tmp_path / "no_jsonl", enable_jsonl=False)
    assert not (tmp_path / "no_tb" / "tb").exists()
    assert (tmp_path / "no_tb" / "metrics.jsonl").exists()
    assert (tmp_path / "no_jsonl" / "tb").is_dir()
    assert not (tmp_path / "no_jsonl" / "metrics.jsonl").exists()
