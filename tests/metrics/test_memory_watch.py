"""Per-step memory metrics, and the one warning event when a peak nears capacity."""

import json

import torch

from arbor_titan.metrics import MetricsConfig
from arbor_titan.metrics.logger import MetricLogger
from arbor_titan.metrics.memory import MemoryWatch, device_capacity_gib, memory_gib

CPU = torch.device("cpu")


def watch(tmp_path, capacity_gib: float) -> tuple[MemoryWatch, MetricLogger]:
    metrics = MetricLogger(MetricsConfig(enable_tensorboard=False), tmp_path, enabled=True)
    return MemoryWatch(CPU, capacity_gib, metrics), metrics


def events(tmp_path) -> list[dict]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [record for line in lines if "event" in (record := json.loads(line))]


def test_cpu_metrics_are_the_peak_rss_against_the_machines_ram(tmp_path):
    memory, metrics = watch(tmp_path, device_capacity_gib(CPU))
    values = memory.read(step=1)
    metrics.close()
    assert set(values) == {"memory_gib", "memory_fraction"}
    assert values["memory_gib"] >= memory_gib(CPU) * 0.99
    assert 0 < values["memory_fraction"] < 0.95
    assert not (tmp_path / "metrics.jsonl").exists() or events(tmp_path) == []


def test_a_peak_within_five_percent_of_capacity_warns_once(tmp_path, caplog):
    capacity = memory_gib(CPU) / 0.97  # the peak is 97% of this capacity
    memory, metrics = watch(tmp_path, capacity)
    memory.read(step=3)
    memory.read(step=4)
    metrics.close()
    [event] = events(tmp_path)
    assert (event["event"], event["step"]) == ("memory_near_capacity", 3)
    assert event["capacity_gib"] == round(capacity, 3)
    assert "within 5% of capacity" in caplog.text
