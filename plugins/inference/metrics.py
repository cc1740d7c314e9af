"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms.

Hand-written in a few dozen lines rather than adding `prometheus_client` as a dependency; every
metric is thread-safe because the engine thread and the HTTP handlers both update them.
"""

import math
import threading
from collections.abc import Sequence

_LabelValues = tuple[str, ...]


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> _LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name} takes labels {self.labels}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labels)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A value that only goes up; its name ends in `_total` as the format asks."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        super().__init__(name, help_text, labels)
        self._values: dict[_LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        samples = [f"{self.name}{_label_text(self.labels, k)} {_format_value(v)}" for k, v in items]
        return super().render() + samples


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def render(self) -> list[str]:
        return super().render() + [f"{self.name} {_format_value(self._value)}"]


class Histogram(_Metric):
    """Cumulative buckets with upper bounds `buckets` (+Inf added), plus sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        self.bounds = sorted(buckets) + [math.inf]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = super().render(), 0
        for bound, count in zip(self.bounds, counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_format_value(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_format_value(total)}")
        lines.append(f"{self.name}_count {cumulative}")
        return lines


def render(metrics: Sequence[_Metric]) -> str:
    """The exposition text of `metrics`, ending in a newline."""
    return "\n".join(line for metric in metrics for line in metric.render()) + "\n"


# Latency buckets from 1 ms to 30 s: CPU decode steps of small models take a few ms, a cold
# prefill of a long prompt on a large model tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """Everything `/metrics` shows."""

    def __init__(self) -> None:
        self.requests = Counter(
            "arbor_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status")
        )
        self.queue_length = Gauge("arbor_queue_length", "Requests waiting for a cache slot.")
        self.running = Gauge("arbor_running_batch_size", "Requests decoding in the batch.")
        self.ttft = Histogram(
            "arbor_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            LATENCY_BUCKETS,
        )
        self.inter_token = Histogram(
            "arbor_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            LATENCY_BUCKETS,
        )
        self.generated_tokens = Counter("arbor_generated_tokens_total", "Tokens generated.")
        self.prompt_tokens = Counter(
            "arbor_prompt_tokens_total", "Prompt tokens of accepted requests."
        )

    def render(self) -> str:
        return render(
            [
                self.requests,
                self.queue_length,
                self.running,
                self.ttft,
                self.inter_token,
                self.generated_tokens,
                self.prompt_tokens,
            ]
        )
