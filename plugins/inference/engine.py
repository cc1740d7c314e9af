"""The generation engine: continuous batching over a static KV cache.

Each `step()` admits waiting requests into free cache slots (one prefill each, which also yields
their first token), then advances every running request by one token in a single batched decode
call. Finished requests free their slot immediately. The engine depends only on the
`CachedForward` protocol; `create_engine` builds one for an Arbor model.
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
from plugins.inference.sampling import SamplingParams, make_generator, sample
from plugins.inference.scheduler import SlotScheduler
from plugins.inference.text_stream import TextStream

logger = logging.getLogger("arbor_titan")

# Decode attends over the cache positions in use, rounded up to a power of two (at least this
# many), so the few distinct lengths keep compiled and CUDA-graph variants few while a short
# sequence in a long cache reads only its own keys.
MIN_KEYS_LEN = 64


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

    prefill_tokens: int = 0
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
        self._scheduler: SlotScheduler[Request] = SlotScheduler(forward.slots)
        self._tokens = [0] * forward.slots  # the token each slot feeds next
        self._positions = [0] * forward.slots  # where that token's key/value goes

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
        """Compile the decode step as one graph and run it (timed in `stats.compile_s`); fall
        back to eager, with a warning, if compilation fails. Call before any request.

        The attended length varies (see `keys_len`): the warm-up runs the two shortest, so the
        second compiles a graph with a symbolic length that serves all the longer ones too and
        no request waits for a compile. (Warming up with the whole cache instead would
        specialize that graph to it: a full-length `narrow` is a special case.)"""
        if self.has_work():
            raise RuntimeError("compile the engine before submitting requests")
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPU
        compiled = torch.compile(self.forward.decode, fullgraph=True, mode=mode)
        start = time.perf_counter()
        try:
            # Inputs made as `step` makes them (distinct tensors, under inference mode), else the
            # first real step fails the guards and compiles again.
            with torch.inference_mode():
                tokens_b, positions_b = (
                    torch.zeros(self.slots, dtype=torch.long, device=self.device) for _ in "tp"
                )
                # Writes position 0 of every slot, all free.
                for keys_len in sorted({self.keys_len(1), self.keys_len(MIN_KEYS_LEN + 1)}):
                    compiled(tokens_b, positions_b, keys_len)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: stay eager
            logger.warning("torch.compile of the decode step failed, running eager: %s", err)
            return
        finally:
            self.stats.compile_s = time.perf_counter() - start
        self._decode = compiled

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
        return Request(ids, params, on_update)

    def enqueue(self, request: Request) -> None:
        """Queue a request made by `make_request` (any thread)."""
        self._scheduler.enqueue(request)

    def keys_len(self, positions_in_use: int) -> int:
        """How many cache positions a decode step attends over, for sequences `positions_in_use`
        long at most: the next power of two, at least `MIN_KEYS_LEN`, at most the cache."""
        return min(self.max_len, max(MIN_KEYS_LEN, 1 << (positions_in_use - 1).bit_length()))

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
        with torch.inference_mode():
            for slot, request in list(self._scheduler.running.items()):
                if request.cancelled:
                    self._finish(slot, request, "cancelled", "")
            for slot, request in self._scheduler.admit():
                self._start(slot, request)
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
            logits_v = self.forward.prefill(prompt_s, slot)
            token = sample(logits_v, params, request._generator, request._seen_v)
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the others
            self._fail(slot, request, err)
            return
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefill_tokens += len(request.prompt_ids)
        self._positions[slot] = len(request.prompt_ids)
        self._accept(slot, request, token)

    def _decode_step(self) -> None:
        start = time.perf_counter()
        tokens_b = torch.tensor(self._tokens, dtype=torch.long, device=self.device)
        positions_b = torch.tensor(self._positions, dtype=torch.long, device=self.device)
        running = list(self._scheduler.running.items())
        keys_len = self.keys_len(1 + max(self._positions[slot] for slot, _ in running))
        logits_bv = self._decode(tokens_b, positions_b, keys_len)
        chosen = self._choose(logits_bv, running)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(running)
        for slot, request in running:
            self._positions[slot] += 1
            if isinstance(chosen[slot], Exception):
                self._fail(slot, request, chosen[slot])
            else:
                self._accept(slot, request, chosen[slot])

    def _choose(
        self, logits_bv: torch.Tensor, running: list[tuple[int, Request]]
    ) -> dict[int, int | Exception]:
        """Next token per running slot: greedy rows in one batched argmax, the rest one by one
        (a row that can't be sampled, e.g. NaN logits, gets its exception instead)."""
        greedy = [slot for slot, r in running if r.params.greedy]
        chosen = dict(zip(greedy, logits_bv[greedy].argmax(-1).tolist())) if greedy else {}
        for slot, r in running:
            if slot not in chosen:
                try:
                    chosen[slot] = sample(logits_bv[slot], r.params, r._generator, r._seen_v)
                except Exception as err:  # noqa: BLE001 - fails this request only
                    chosen[slot] = err
        return chosen

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
            # A free slot still decodes (fixed shapes): keep its writes inside the cache.
            self._tokens[slot] = self._positions[slot] = 0
        request.finish_reason = reason
        if request._stream is not None:
            request.text = request._stream.text
        if request.on_update is not None:
            request.on_update(request, delta)
        request.done.set()


@register("inference_engine", "static_kv")
def create_engine(
    model: Transformer,
    tokenizer: TextTokenizer,
    slots: int,
    max_len: int,
    compile: bool = False,
    pack_weights: bool = True,
) -> Engine:
    """An engine for an Arbor model: `slots` sequences of up to `max_len` tokens each.
    `pack_weights`: bf16/fp16 on CPU decode from a second copy of the weights in oneDNN's
    blocked layout (see matvec.py); False saves that memory."""
    forward = ArborCachedForward(model, slots, max_len, pack_weights)
    engine = Engine(forward, tokenizer, model.tok_embeddings.weight.device)
    if compile:
        engine.compile()
    return engine
