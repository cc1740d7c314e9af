"""The engine: batching and continuous batching change nothing in a request's output; sampling
is reproducible per request; generation stops at EOS, stop strings, max tokens, a full cache."""

import threading

import pytest
import torch

from arbor_titan import registry
from plugins.inference.engine import Engine, batch_buckets, create_engine
from plugins.inference.sampling import SamplingParams
from plugins.inference.service import EngineLoop
from tests.plugins.inference.tiny import random_model, tiny_args

PROMPTS = ["def f(x):\n    return", "import", "class Point:\n    def __init__(self, x, y):\n"]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def alone(loaded, prompt, params):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
    return engine.generate([prompt], params)[0]


def test_batched_prompts_of_different_lengths_equal_each_alone(loaded):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=4, max_len=64)
    batched = engine.generate(PROMPTS, GREEDY)
    for prompt, request in zip(PROMPTS, batched):
        single = alone(loaded, prompt, GREEDY)
        assert request.output_ids == single.output_ids
        assert request.text == single.text == loaded.tokenizer.decode(single.output_ids)
        assert request.finish_reason == "length" and len(request.output_ids) == 12
    assert engine.stats.decode_steps == 11  # one batched step per token after the prefill's


def test_requests_joining_a_running_batch_equal_each_alone(loaded):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=2, max_len=64)
    short = SamplingParams(max_new_tokens=5, ignore_eos=True)
    first = engine.submit(PROMPTS[0], GREEDY)
    engine.step()
    engine.step()
    second = engine.submit(PROMPTS[1], short)  # joins at the next step
    third = engine.submit(PROMPTS[2], GREEDY)  # waits until `second` frees its slot
    engine.step()
    assert engine.running == 2 and engine.waiting == 1
    while engine.has_work():
        engine.step()
    assert second.done.is_set() and third.done.is_set()
    for request, prompt, params in ((first, 0, GREEDY), (second, 1, short), (third, 2, GREEDY)):
        assert request.output_ids == alone(loaded, PROMPTS[prompt], params).output_ids


def test_seeded_sampling_is_reproducible_alone_and_batched(loaded):
    params = SamplingParams(
        max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True
    )
    first = alone(loaded, PROMPTS[0], params).output_ids
    assert alone(loaded, PROMPTS[0], params).output_ids == first
    engine = create_engine(loaded.model, loaded.tokenizer, slots=3, max_len=64)
    other = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True)
    batched = engine.generate(PROMPTS, [params, other, GREEDY])
    assert batched[0].output_ids == first
    reseeded = SamplingParams(**{**params.__dict__, "seed": 8})
    assert alone(loaded, PROMPTS[0], reseeded).output_ids != first


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(loaded):
    full = alone(loaded, PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True)).text
    stop = full[8:11]
    deltas = []
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
    request = engine.submit(
        PROMPTS[0],
        SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop, "never-generated")),
        lambda r, delta: deltas.append(delta),
    )
    while engine.has_work():
        engine.step()
    assert request.finish_reason == "stop"
    assert request.text == full[: full.index(stop)]
    assert "".join(deltas) == request.text


class ScriptedForward:
    """Logits choosing `script(position)` as the token at each position: engine logic without a
    model. Byte-fallback pieces (id 3 + byte) make the text exact; id 2 is EOS."""

    vocab_size = 384

    def __init__(self, slots, max_len, script):
        self.slots, self.max_len, self.script = slots, max_len, script
        self.batch_sizes = []  # rows of each decode call

    def _one_hot(self, positions):
        logits = torch.zeros(len(positions), self.vocab_size)
        for row, token in enumerate(self.script(p) for p in positions):
            logits[row, token] = 1.0 if token >= 0 else float("nan")  # -1: a broken row
        return logits

    def assign(self, slot, prompt, positions):
        return 0

    def can_hold(self, positions):
        return True

    def release(self, slot):
        pass

    def prefill(self, tokens_s, slot, start):
        if 99 in tokens_s.tolist():
            raise RuntimeError("poisoned prompt")
        return self._one_hot([len(tokens_s)])[0]

    def decode(self, slots_b, tokens_b, positions_b, keys_len):
        assert positions_b.max() < keys_len <= self.max_len  # every row's keys are attended
        self.batch_sizes.append(len(slots_b))
        return self._one_hot([p + 1 for p in positions_b.tolist()])


def letters(eos_at=None, nan_at=None):
    return lambda p: {eos_at: 2, nan_at: -1}.get(p, 3 + ord("abcdefghij"[p % 10]))


def scripted_engine(tokenizer, script, slots=2, max_len=32):
    return Engine(ScriptedForward(slots, max_len, script), tokenizer, torch.device("cpu"))


def test_eos_stops_unless_ignored(tokenizer):
    engine = scripted_engine(tokenizer, letters(eos_at=6))
    stopped, ignored = engine.generate(
        [[1, 3, 3], [1, 3, 3]],
        [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, ignore_eos=True)],
    )
    assert (stopped.finish_reason, stopped.text, stopped.output_ids[-1]) == ("stop", "def", 2)
    assert (ignored.finish_reason, len(ignored.output_ids)) == ("length", 10)


def test_max_new_tokens_and_a_full_cache_end_with_length(tokenizer):
    engine = scripted_engine(tokenizer, letters(), max_len=8)
    capped, filled = engine.generate(
        [[1, 3], [1, 3, 3, 3, 3]], [SamplingParams(max_new_tokens=3), SamplingParams(100)]
    )
    assert (capped.finish_reason, capped.text) == ("length", "cde")
    # 5 prompt positions + 3 generated that fit the cache + the last one, which needs no slot.
    assert (filled.finish_reason, filled.text) == ("length", "fghi")


def test_a_failing_or_cancelled_request_leaves_the_others_running(tokenizer):
    engine = scripted_engine(tokenizer, letters(nan_at=4), slots=3)
    poisoned = engine.submit([1, 99], SamplingParams(max_new_tokens=5))
    cancelled = engine.submit([1, 3, 3, 3, 3, 3], SamplingParams(max_new_tokens=20))
    unsampleable = engine.submit([1, 3], SamplingParams(max_new_tokens=5, temperature=1.0))
    healthy = engine.submit([1, 3, 3, 3, 3], SamplingParams(max_new_tokens=5))
    engine.step()
    assert poisoned.finish_reason == "error" and "poisoned prompt" in poisoned.error
    engine.step()  # the decode reaching position 4 gets NaN logits
    assert unsampleable.finish_reason == "error" and "probability" in unsampleable.error
    cancelled.cancelled = True
    while engine.has_work():
        engine.step()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.output_ids) < 20
    assert (healthy.finish_reason, healthy.text) == ("length", "fghij")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "empty"), (list(range(1, 40)), "39 tokens"), ([1, 384], "outside")],
)
def test_prompts_that_cannot_run_are_refused_at_submit(tokenizer, prompt, message):
    engine = scripted_engine(tokenizer, letters())
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=0))
    assert not engine.has_work()


def test_decode_attends_over_the_used_positions_rounded_up_to_a_power_of_two(loaded):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=300)
    assert [engine.keys_len(n) for n in (1, 64, 65, 128, 129, 256, 257, 300)] == [
        *(64, 64, 128, 128, 256, 256, 300, 300)
    ]
    short = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=40)
    assert short.keys_len(1) == short.keys_len(40) == 40


def test_registered_as_paged_kv_engine():
    assert registry.get("inference_engine", "paged_kv") is create_engine


def test_each_step_decodes_the_running_requests_only(tokenizer):
    """A lone request on a 4-slot engine decodes one row, whatever the slots (eager: exact)."""
    engine = scripted_engine(tokenizer, letters(), slots=4)
    engine.generate([[1, 3]], SamplingParams(max_new_tokens=4))
    assert engine.forward.batch_sizes == [1, 1, 1]
    engine.forward.batch_sizes.clear()
    engine.generate([[1, 3], [1, 3]], [SamplingParams(max_new_tokens=n) for n in (2, 4)])
    assert engine.forward.batch_sizes == [2, 1, 1]


def test_batch_buckets_are_powers_of_two_up_to_the_slots():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)


class RecordingCompiler:
    """`torch.compile` replaced by a wrapper that runs the function eagerly and records each
    call's thread and batch size: where the warm-up runs, without a real compile's minutes."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, **options):
        def compiled(slots_b, *rest):
            self.calls.append((threading.current_thread().name, len(slots_b)))
            return fn(slots_b, *rest)

        return compiled


def test_compiled_warm_up_runs_on_the_engine_loop_thread(loaded, monkeypatch):
    """CUDA graphs are kept per thread: every warm-up shape runs where the server steps."""
    compiler = RecordingCompiler()
    monkeypatch.setattr(torch, "compile", compiler)
    engine = create_engine(loaded.model, loaded.tokenizer, slots=4, max_len=64, compile=True)
    assert compiler.calls == []  # nothing on the caller's thread
    loop = EngineLoop(engine).start()
    try:
        request = loop.submit(PROMPTS[0], SamplingParams(max_new_tokens=3))
        assert request.done.wait(30)
    finally:
        loop.stop()
    warm_up = compiler.calls[:3]  # batch buckets 1, 2, 4 at the one attended length, 64
    assert warm_up == [("engine-loop", 1), ("engine-loop", 2), ("engine-loop", 4)]
    assert {thread for thread, _ in compiler.calls} == {"engine-loop"}
    assert engine.stats.compile_s > 0


def test_compiled_steps_pad_to_a_bucket_and_equal_each_alone(loaded, monkeypatch):
    """Three live requests on a compiled 4-slot engine decode as 4 rows (a copy of the last
    row pads them), yet each gets the tokens it gets alone."""
    compiler = RecordingCompiler()
    monkeypatch.setattr(torch, "compile", compiler)
    engine = create_engine(loaded.model, loaded.tokenizer, slots=4, max_len=64, compile=True)
    batched = engine.generate(PROMPTS, GREEDY)
    assert [n for _, n in compiler.calls[3:]] == [4] * 11
    for prompt, request in zip(PROMPTS, batched):
        assert request.output_ids == alone(loaded, prompt, GREEDY).output_ids


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(tokenizer):
    """Generation runs through attended lengths 64, 128 and 160 and batch sizes 2 then 1 on
    the graphs compiled by the warm-up, with no compile on the way."""
    # One layer: a cold compile costs ~20-50 s per layer on 2 busy cores.
    model = random_model(tiny_args(n_layers=1))
    eager = create_engine(model, tokenizer, slots=2, max_len=160)
    compiled = create_engine(model, tokenizer, slots=2, max_len=160, compile=True)
    compiled.warm_up()
    assert compiled.stats.compile_s > 0 and compiled._decode is not compiled.forward.decode
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (60, 150)]
    expected = [r.output_ids for r in eager.generate(PROMPTS[:2], params)]
    assert max(len(ids) for ids in expected) > 128
    with torch._dynamo.config.patch(error_on_recompile=True):  # the warm-up graphs are reused
        assert [r.output_ids for r in compiled.generate(PROMPTS[:2], params)] == expected


def test_a_request_that_fills_its_cache_slot_leaves_the_batch_running(loaded):
    engine = create_engine(loaded.model, loaded.tokenizer, slots=2, max_len=16)
    full, other = engine.generate(
        [list(range(1, 13)), [1, 40]],
        [SamplingParams(max_new_tokens=100, ignore_eos=True), GREEDY],
    )
    assert (full.finish_reason, len(full.output_ids)) == ("length", 5)
    assert other.output_ids == alone(loaded, [1, 40], GREEDY).output_ids
