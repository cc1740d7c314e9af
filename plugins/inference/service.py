"""The engine in one background thread: callers (HTTP handlers) only submit requests.

One thread owns the model and the cache: it first warms the engine up (a compiled decode's CUDA
graphs belong to the thread that records them), then steps it while any request runs or waits
and sleeps otherwise. If a step raises, the loop records the error, fails every pending
request so no caller waits forever, and stops; `/health` then reports 503.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence

from plugins.inference.engine import Engine, Request
from plugins.inference.metrics import ServerMetrics
from plugins.inference.sampling import SamplingParams

logger = logging.getLogger("arbor_titan")


class EngineStopped(RuntimeError):
    """The engine loop is not running (it failed or was stopped)."""


class EngineLoop:
    """Continuous batching in a daemon thread, with latency and load recorded in `metrics`."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders submissions against the loop's end
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a request (ValueError for a prompt the engine can't take)."""
        arrived = time.perf_counter()
        last_token = [arrived, 0]  # time of the latest token, tokens seen so far

        def observe(request: Request, delta: str) -> None:
            now, new_tokens = time.perf_counter(), len(request.output_ids) - last_token[1]
            if new_tokens > 0:
                histogram = self.metrics.ttft if last_token[1] == 0 else self.metrics.inter_token
                histogram.observe(now - last_token[0])
                self.metrics.generated_tokens.inc(new_tokens)
                last_token[:] = [now, len(request.output_ids)]
            if on_update is not None:
                try:
                    on_update(request, delta)
                except Exception:  # noqa: BLE001 - a caller's failure must not stop the engine
                    logger.exception("request callback failed; cancelling the request")
                    request.cancelled = True

        with self._lock:
            if not self.alive:
                raise EngineStopped(self.error or "the engine loop is not running")
            request = self.engine.submit(prompt, params, observe)
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        self.metrics.queue_length.set(self.engine.waiting)
        self._wake.set()
        return request

    def _run(self) -> None:
        message = "the server is shutting down"
        try:
            self.engine.warm_up()
            while not self._stop.is_set():
                if not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.engine.step()
                self.metrics.queue_length.set(self.engine.waiting)
                self.metrics.running.set(self.engine.running)
        except Exception as err:  # noqa: BLE001 - reported through /health, never re-raised
            logger.exception("engine loop failed")
            self.error = f"{type(err).__name__}: {err}"
            message = f"engine failed: {self.error}"
        with self._lock:
            self._closed = True
            self.engine.fail_all(message)
        self.metrics.running.set(0)
        self.metrics.queue_length.set(0)
