"""The server's Prometheus metrics, kept by `prometheus_client` (thread-safe: the engine thread
and the HTTP handlers both update them) in a registry of their own, so several servers in one
process (tests, benchmarks) never collide on a metric name."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Latency buckets from 1 ms to 30 s: CPU decode steps of small models take a few ms, a cold
# prefill of a long prompt on a large model tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """Everything `/metrics` shows."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "arbor_requests",
            "HTTP requests by endpoint and status.",
            ("endpoint", "status"),
            registry=registry,
        )
        self.queue_length = Gauge(
            "arbor_queue_length", "Requests waiting for a cache slot.", registry=registry
        )
        self.running = Gauge(
            "arbor_running_batch_size", "Requests decoding in the batch.", registry=registry
        )
        self.ttft = Histogram(
            "arbor_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "arbor_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "arbor_generated_tokens", "Tokens generated.", registry=registry
        )
        self.prompt_tokens = Counter(
            "arbor_prompt_tokens", "Prompt tokens of accepted requests.", registry=registry
        )

    def render(self) -> bytes:
        """The exposition of every metric, in Prometheus' text format."""
        return generate_latest(self.registry)
