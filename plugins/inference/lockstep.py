"""Serving a tensor-parallel model: every process of the group runs the same engine, and all
must take the same steps with the same requests, since each step's matrix products meet in
collectives. Process 0, the server, decides: before each step it broadcasts the requests that
arrived and the ones cancelled since the last step; every process applies them and steps. The
other processes run `follow` until process 0 closes.

The engine reads a request's `cancelled` flag inside a step, so the requests the server hands
out (set by HTTP threads at any time) are not the ones the engine runs: each has a replica that
changes only when the orders are applied, and the replica's progress is copied back.
"""

import itertools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch.distributed as dist

from plugins.inference.engine import Engine, Request
from plugins.inference.sampling import SamplingParams

logger = logging.getLogger("arbor_titan")

# Idle, process 0 still sends (empty) orders this often, so the others never sit in a
# collective long enough to time out.
IDLE_ORDERS_S = 0.5


@dataclass
class _Orders:
    """What every process does before its next step."""

    new: list[tuple[int, list[int], SamplingParams]]  # request id, prompt ids, params
    cancelled: list[int]
    step: bool


class _Replicas:
    """The requests the engine runs, by id; identical in every process."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requests: dict[int, Request] = {}

    def apply(
        self, orders: _Orders, relay: Callable[[int], Callable[[Request, str], None] | None]
    ) -> None:
        self.requests = {i: r for i, r in self.requests.items() if not r.done.is_set()}
        for request_id, ids, params in orders.new:
            request = self.engine.make_request(ids, params, relay(request_id))
            self.engine.enqueue(request)
            self.requests[request_id] = request
        for request_id in orders.cancelled:
            if request_id in self.requests:
                self.requests[request_id].cancelled = True
        if orders.step:
            self.engine.step()


class LockstepEngine:
    """Process 0's engine, in the shape `EngineLoop` and the server use, kept in step with the
    other processes of `group` (which run `follow`)."""

    def __init__(self, engine: Engine, group: dist.ProcessGroup):
        self.engine, self.group = engine, group
        self._replicas = _Replicas(engine)
        self._handed_out: dict[int, Request] = {}  # by id, until finished
        self._pending: list[Request] = []  # handed out, not yet ordered
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._ids = itertools.count()

    # -- what EngineLoop and the server read, as on an Engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def waiting(self) -> int:
        return self.engine.waiting + len(self._pending)

    def warm_up(self) -> None:
        """The engine's warm-up, which every process runs before its first orders (a compiled
        tensor-parallel decode meets in collectives)."""
        self.engine.warm_up()

    def has_work(self) -> bool:
        """Always: `step` waits for work itself, sending idle orders while it waits."""
        return True

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a prompt for the next step of every process (any thread)."""
        if params.seed is None:  # every process must draw the same samples
            params = replace(params, seed=random.randrange(2**63))
        request = self.engine.make_request(prompt, params, on_update)
        with self._lock:
            self._pending.append(request)
        self._arrived.set()
        return request

    def step(self) -> None:
        """Send the orders, apply them here, step (or, with nothing to do, wait a little)."""
        if not self.engine.has_work() and not self._pending:
            self._arrived.wait(IDLE_ORDERS_S)
            self._arrived.clear()
        with self._lock:
            new, self._pending = self._pending, []
        ordered = [(next(self._ids), request) for request in new]
        self._handed_out |= dict(ordered)
        orders = _Orders(
            new=[(i, r.prompt_ids, r.params) for i, r in ordered],
            cancelled=[i for i, r in self._handed_out.items() if r.cancelled],
            step=bool(new) or self.engine.has_work(),
        )
        dist.broadcast_object_list([orders], src=0, group=self.group)
        self._replicas.apply(orders, self._relay)

    def fail_all(self, message: str) -> None:
        """Release the other processes, then finish every request with `message`."""
        try:
            dist.broadcast_object_list([None], src=0, group=self.group)
        except Exception as err:  # noqa: BLE001 - e.g. they were stopped already; finish anyway
            logger.warning("could not release the other tensor-parallel processes: %s", err)
        self.engine.fail_all(message)
        with self._lock:
            left, self._pending = [*self._handed_out.values(), *self._pending], []
        for request in left:
            if not request.done.is_set():
                _copy_progress(request, request, "error", message)

    def _relay(self, request_id: int) -> Callable[[Request, str], None]:
        """The replica's on_update: copy its progress to the request handed out."""
        handed_out = self._handed_out[request_id]

        def relay(replica: Request, delta: str) -> None:
            _copy_progress(handed_out, replica, replica.finish_reason, replica.error, delta)
            if replica.finish_reason is not None:
                self._handed_out.pop(request_id, None)

        return relay


def follow(engine: Engine, group: dist.ProcessGroup) -> None:
    """Run `engine` as process 0's `LockstepEngine` orders, until it closes."""
    replicas = _Replicas(engine)
    engine.warm_up()  # as process 0's engine loop does first
    while True:
        received = [None]
        dist.broadcast_object_list(received, src=0, group=group)
        if received[0] is None:
            return
        replicas.apply(received[0], lambda request_id: None)


def _copy_progress(
    target: Request,
    source: Request,
    finish_reason: str | None,
    error: str | None,
    delta: str = "",
) -> None:
    target.output_ids, target.text = source.output_ids, source.text  # shared, not copied
    target.finish_reason, target.error = finish_reason, error
    if target.on_update is not None:
        target.on_update(target, delta)
    if finish_reason is not None:
        target.done.set()
