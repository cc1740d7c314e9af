"""The generation engine: continuous batching over a paged KV cache.

Each `step()` admits waiting requests, in arrival order, into free slots while the cache has
blocks for them (a request the cache can't hold yet waits): one prefill each, of the prompt past
any prefix cached already, which also yields their first token. Then it advances every running
request by one token in a single batched decode call over the running requests only (a lone
request decodes at the batch-1 speed whatever the number of slots). Finished requests free their
slot and blocks immediately. The engine depends only on the `CachedForward` protocol;
`create_engine` builds one for an Arbor model.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from arbor_titan.models.arbor.model import Transformer
from arbor_titan.registry import register
from plugins.inference.decoder import ArborCachedForward, CachedForward
from plugins.inference.kv_cache import BLOCK_SIZE
from plugins.inference.sampling import SamplingParams, make_generator, sample
from plugins.inference.scheduler import SlotScheduler
from plugins.inference.tensor_parallel import local
from plugins.inference.text_stream import TextStream

logger = logging.getLogger("arbor_titan")

# Decode attends over the cache positions in use, rounded up to a power of two (at least this
# many), so the few distinct lengths keep compiled and CUDA-graph variants few while a short
# sequence in a long cache reads only its own keys.
MIN_KEYS_LEN = 64


def batch_buckets(slots: int) -> tuple[int, ...]:
    """The batch sizes a compiled decode runs at: powers of two below `slots`, and `slots`. A
    step pads its live rows up to the next one, so CUDA graphs stay few (one per bucket and
    attended length) while a lone request pays for one row, not `slots`."""
    return (*(1 << i for i in range((slots - 1).bit_length()) if 1 << i < slots), slots)


def _static_batch(*inputs_b: torch.Tensor) -> None:
    """Keep the batch size of a compiled decode's inputs static: a graph per bucket. (A
    symbolic batch size made the compiled CPU step 2x slower than eager, measured.)"""
    for tensor in inputs_b:
        torch._dynamo.mark_static(tensor, 0)


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(eq=False)
class Request:
    """One prompt in generation. The engine appends to `output_ids` and `text` and calls
    `on_update(request, new_text)` after every token; the last call has `finish_reason` set:
    "stop" (EOS or a stop string), "length" (max_new_tokens or a full cache), "cancelled", or
    "error" (then `error` says why)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[["Request", str], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _stream: TextStream | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _seen_v: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class EngineStats:
    """Where the time went; compile time is kept apart from generation time."""

    prefill_tokens: int = 0  # computed; prompt positions found cached are not
    cached_prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


class Engine:
    """Continuous batching of requests over a `CachedForward`'s slots."""

    def __init__(self, forward: CachedForward, tokenizer: TextTokenizer, device: torch.device):
        self.forward, self.tokenizer, self.device = forward, tokenizer, torch.device(device)
        self.stats = EngineStats()
        self._decode = forward.decode
        self._buckets: tuple[int, ...] | None = None  # compiled batch sizes; None: exact
        self._warm_up_due = False
        self._scheduler: SlotScheduler[Request] = SlotScheduler(forward.slots)
        self._tokens = [0] * forward.slots  # the token each slot feeds next
        self._positions = [0] * forward.slots  # where that token's key/value goes
        self._cached = [0] * forward.slots  # prompt positions cached when the slot was assigned

    @property
    def slots(self) -> int:
        return self.forward.slots

    @property
    def max_len(self) -> int:
        return self.forward.max_len

    @property
    def running(self) -> int:
        return len(self._scheduler.running)

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    def has_work(self) -> bool:
        return self._scheduler.busy

    def compile(self) -> None:
        """Compile the decode step as one graph per batch bucket, at the warm-up (see
        `warm_up`). Call before any request."""
        if self.has_work():
            raise RuntimeError("compile the engine before submitting requests")
        self._warm_up_due = True

    def warm_up(self) -> None:
        """Compile the decode step and run it at every shape it will meet (timed in
        `stats.compile_s`), on the calling thread: the thread that will step the engine, since
        CUDA graphs are recorded and kept per thread. Falls back to eager, with a warning, if
        compilation fails. `step` calls it if nobody did; a no-op without `compile()`.

        Shapes are each batch bucket at each attended length (see `keys_len`). The two shortest
        lengths come first, so the second compiles a graph with a symbolic length that serves
        the longer ones (warming up with the whole cache first would specialize it: a
        full-length `narrow` is a special case); on CUDA each shape runs three times, as CUDA
        graph trees warm up, record, then replay."""
        if not self._warm_up_due:
            return
        self._warm_up_due = False
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPU
        compiled = torch.compile(self.forward.decode, fullgraph=True, mode=mode)
        calls_per_shape = 3 if self.device.type == "cuda" else 1
        start = time.perf_counter()
        try:
            # Inputs made as `step` makes them (distinct tensors, under inference mode), else the
            # first real step fails the guards and compiles again. Writes position 0 of slots
            # that are all free.
            with torch.inference_mode():
                for batch in batch_buckets(self.slots):
                    slots_b = torch.arange(batch, device=self.device)
                    tokens_b, positions_b = (torch.zeros_like(slots_b) for _ in "tp")
                    _static_batch(slots_b, tokens_b, positions_b)
                    for keys_len in self.attended_lengths():
                        for _ in range(calls_per_shape):
                            compiled(slots_b, tokens_b, positions_b, keys_len)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: stay eager
            logger.warning("torch.compile of the decode step failed, running eager: %s", err)
            return
        finally:
            self.stats.compile_s = time.perf_counter() - start
        self._decode, self._buckets = compiled, batch_buckets(self.slots)
        logger.info(
            "compiled the decode step in %.1fs on thread %r (batch sizes %s)",
            self.stats.compile_s,
            threading.current_thread().name,
            self._buckets,
        )

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """Queue a prompt (text gets a BOS in front, as documents had in training). Safe to call
        from any thread; the request joins at the next `step()`."""
        request = self.make_request(prompt, params, on_update)
        self.enqueue(request)
        return request

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str], None] | None = None,
    ) -> Request:
        """A checked request, not queued yet (ValueError for one the engine can't run)."""
        params.validate()
        ids = (
            [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
            if isinstance(prompt, str)
            else list(prompt)
        )
        self.check_prompt(ids)
        if not self.forward.can_hold(self._positions_needed(len(ids), params)):
            raise ValueError(
                f"a prompt of {len(ids)} tokens with max_new_tokens={params.max_new_tokens} "
                "needs more KV cache than the whole cache holds"
            )
        return Request(ids, params, on_update)

    def enqueue(self, request: Request) -> None:
        """Queue a request made by `make_request` (any thread)."""
        self._scheduler.enqueue(request)

    def keys_len(self, positions_in_use: int) -> int:
        """How many cache positions a decode step attends over, for sequences `positions_in_use`
        long at most: the next power of two, at least `MIN_KEYS_LEN`, at most the cache."""
        return min(self.max_len, max(MIN_KEYS_LEN, 1 << (positions_in_use - 1).bit_length()))

    def attended_lengths(self) -> list[int]:
        """Every value `keys_len` takes, shortest first."""
        lengths = [self.keys_len(1)]
        while lengths[-1] < self.max_len:
            lengths.append(self.keys_len(lengths[-1] + 1))
        return lengths

    def check_prompt(self, ids: Sequence[int]) -> None:
        """Raise ValueError when a prompt can't run: empty, too long, or an unknown token id."""
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) > self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the KV cache holds {self.max_len}")
        bad = [i for i in ids if not 0 <= i < self.forward.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside [0, {self.forward.vocab_size})"
            )

    def step(self) -> None:
        """Admit waiting requests into free slots, then decode one token for every running one."""
        self.warm_up()
        with torch.inference_mode():
            for slot, request in list(self._scheduler.running.items()):
                if request.cancelled:
                    self._finish(slot, request, "cancelled", "")
            while (admitted := self._scheduler.admit_next(self._assign)) is not None:
                self._start(*admitted)
            if self._scheduler.running:
                self._decode_step()

    def fail_all(self, message: str) -> None:
        """Finish every running and waiting request with `message` (the engine can't go on)."""
        for slot, request in list(self._scheduler.running.items()):
            request.error = message
            self._finish(slot, request, "error", "")
        for request in self._scheduler.drain():
            request.error = message
            self._finish(None, request, "error", "")

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[Request]:
        """Run prompts to completion (all queued at once) and return their finished requests."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        requests = [self.submit(p, sp) for p, sp in zip(prompts, each, strict=True)]
        while not all(r.done.is_set() for r in requests):
            self.step()
        return requests

    # -- internals (engine thread only)

    def _positions_needed(self, prompt_len: int, params: SamplingParams) -> int:
        """Cache positions a request fills: its prompt and every generated token but the last
        (never fed back), within the slot's `max_len`."""
        return min(prompt_len + params.max_new_tokens - 1, self.max_len)

    def _assign(self, slot: int, request: Request) -> bool:
        needed = self._positions_needed(len(request.prompt_ids), request.params)
        cached = self.forward.assign(slot, request.prompt_ids, needed)
        if cached is None:
            return False
        self._cached[slot] = cached
        return True

    def _start(self, slot: int, request: Request) -> None:
        if request.cancelled:
            self._finish(slot, request, "cancelled", "")
            return
        params = request.params
        request._stream = TextStream(self.tokenizer, params.stop)
        request._generator = make_generator(params, self.device)
        if params.repetition_penalty != 1.0:
            request._seen_v = torch.zeros(self.forward.vocab_size, dtype=torch.bool)
            request._seen_v[request.prompt_ids] = True
            request._seen_v = request._seen_v.to(self.device)
        start = time.perf_counter()
        try:
            prompt_s = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
            logits_v = self.forward.prefill(prompt_s, slot, self._cached[slot])
            token = sample(logits_v, params, request._generator, request._seen_v)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the others
            self._fail(slot, request, err)
            return
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_tokens += len(request.prompt_ids) - self._cached[slot]
        self.stats.cached_prompt_tokens += self._cached[slot]
        self._positions[slot] = len(request.prompt_ids)
        self._accept(slot, request, token)

    def _decode_step(self) -> None:
        start = time.perf_counter()
        running = sorted(self._scheduler.running.items())
        rows = [slot for slot, _ in running]
        if self._buckets is not None:  # pad with copies of the last row, dropped below
            rows += rows[-1:] * (next(b for b in self._buckets if b >= len(rows)) - len(rows))
        slots_b, tokens_b, positions_b = (
            torch.tensor(values, dtype=torch.long, device=self.device)
            for values in (
                rows,
                [self._tokens[s] for s in rows],
                [self._positions[s] for s in rows],
            )
        )
        keys_len = self.keys_len(1 + max(self._positions[slot] for slot in rows))
        if self._buckets is not None:
            _static_batch(slots_b, tokens_b, positions_b)
        logits_bv = self._decode(slots_b, tokens_b, positions_b, keys_len)
        chosen = self._choose(logits_bv, running)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(running)
        for (slot, request), token in zip(running, chosen):
            self._positions[slot] += 1
            if isinstance(token, Exception):
                self._fail(slot, request, token)
            else:
                self._accept(slot, request, token)

    def _choose(
        self, logits_bv: torch.Tensor, running: list[tuple[int, Request]]
    ) -> list[int | Exception]:
        """Next token per running request (row b of the logits is `running[b]`): greedy rows in
        one batched argmax, the rest one by one (a row that can't be sampled, e.g. NaN logits,
        gets its exception instead)."""
        greedy = [row for row, (_, r) in enumerate(running) if r.params.greedy]
        chosen: dict[int, int | Exception] = (
            dict(zip(greedy, logits_bv[greedy].argmax(-1).tolist())) if greedy else {}
        )
        for row, (_, r) in enumerate(running):
            if row not in chosen:
                try:
                    chosen[row] = sample(logits_bv[row], r.params, r._generator, r._seen_v)
                except Exception as err:  # noqa: BLE001 - fails this request only
                    chosen[row] = err
        return [chosen[row] for row in range(len(running))]

    def _fail(self, slot: int, request: Request, err: Exception) -> None:
        logger.warning("request failed: %s: %s", type(err).__name__, err)
        request.error = f"{type(err).__name__}: {err}"
        self._finish(slot, request, "error", "")

    def _accept(self, slot: int, request: Request, token: int) -> None:
        request.output_ids.append(token)
        self._tokens[slot] = token
        if request._seen_v is not None:
            request._seen_v[token] = True
        stream, params = request._stream, request.params
        if token == self.tokenizer.eos_id and not params.ignore_eos:
            self._finish(slot, request, "stop", stream.flush())
            return
        delta = stream.push(token)
        if stream.stopped:
            self._finish(slot, request, "stop", delta)
        elif (
            len(request.output_ids) >= params.max_new_tokens
            or self._positions[slot] >= self.max_len
        ):
            self._finish(slot, request, "length", delta + stream.flush())
        else:
            request.text = stream.text
            if request.on_update is not None:
                request.on_update(request, delta)

    def _finish(self, slot: int | None, request: Request, reason: str, delta: str) -> None:
        if slot is not None:
            self._scheduler.release(slot)
            self.forward.release(slot)
        request.finish_reason = reason
        if request._stream is not None:
            request.text = request._stream.text
        if request.on_update is not None:
            request.on_update(request, delta)
        request.done.set()


@register("inference_engine", "paged_kv")
def create_engine(
    model: Transformer,
    tokenizer: TextTokenizer,
    slots: int,
    max_len: int,
    compile: bool = False,
    pack_weights: bool = True,
    kv_cache_bytes: int | None = None,
) -> Engine:
    """An engine for an Arbor model: up to `slots` sequences of up to `max_len` tokens each, in
    a KV cache of `kv_cache_bytes` (default: room for every slot's `max_len` positions).
    `pack_weights`: bf16/fp16 on CPU decode from a second copy of the weights in oneDNN's
    blocked layout (see matvec.py); False saves that memory."""
    blocks = None if kv_cache_bytes is None else kv_cache_bytes // kv_block_bytes(model)
    if blocks is not None and blocks < 1:
        raise ValueError(f"a KV cache of {kv_cache_bytes} bytes holds no block")
    forward = ArborCachedForward(model, slots, max_len, pack_weights, blocks)
    engine = Engine(forward, tokenizer, model.tok_embeddings.weight.device)
    if compile:
        engine.compile()
    return engine


def kv_block_bytes(model: Transformer) -> int:
    """Bytes of one KV-cache block of this process's share of the model, over all layers."""
    args, weight = model.args, next(iter(model.layers.values())).attention.wk.weight
    kv_heads = local(weight).shape[0] // args.head_dim
    return 2 * args.n_layers * kv_heads * BLOCK_SIZE * args.head_dim * weight.dtype.itemsize
