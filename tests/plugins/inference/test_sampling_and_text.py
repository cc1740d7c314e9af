"""Sampling filters keep exactly the tokens they promise; text streams never take text back."""

import pytest
import torch

from plugins.inference.sampling import SamplingParams, sample
from plugins.inference.scheduler import SlotScheduler
from plugins.inference.text_stream import TextStream

LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])


def draws(params, logits=LOGITS, seen=None, n=300):
    generator = torch.Generator().manual_seed(0)
    return {sample(logits, params, generator, seen) for _ in range(n)}


def test_greedy_is_argmax_and_temperature_samples_widely():
    assert draws(SamplingParams()) == {0}
    assert len(draws(SamplingParams(temperature=5.0))) == 6


def test_a_vanishing_temperature_is_greedy_not_nan():
    """1e-40 would overflow logits / temperature to inf (NaN probabilities): it means argmax."""
    tiny = SamplingParams(temperature=1e-40)
    assert tiny.greedy and draws(tiny, LOGITS * 1e3, n=3) == {0}


def test_top_k_and_top_p_keep_only_the_most_likely():
    assert draws(SamplingParams(temperature=5.0, top_k=2)) == {0, 1}
    # softmax(LOGITS): 0.64, 0.23, 0.09, ...: top_p 0.8 needs the first two tokens, 0.5 one.
    assert draws(SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {0}


def test_repetition_penalty_pushes_seen_tokens_down():
    seen = torch.tensor([True, False, False, False, False, False])
    assert draws(SamplingParams(repetition_penalty=1.5), seen=seen) == {1}  # 4/1.5 < 3
    logits = torch.tensor([-1.0, -1.2])
    seen = torch.tensor([True, False])
    assert draws(SamplingParams(repetition_penalty=1.5), logits, seen) == {1}  # -1.5 < -1.2


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0)
    first = [sample(LOGITS, params, torch.Generator().manual_seed(3)) for _ in range(20)]
    again = [sample(LOGITS, params, torch.Generator().manual_seed(3)) for _ in range(20)]
    assert first == again


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"temperature": -1},
        {"top_k": -1},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
        {"stop": ("",)},
    ],
)
def test_invalid_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad).validate()


class ByteTokens:
    """Token i is byte i: multi-byte characters arrive in pieces, like byte fallback."""

    @staticmethod
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_all(text, stop=()):
    stream = TextStream(ByteTokens(), stop)
    deltas = []
    for byte in text.encode():
        deltas.append(stream.push(byte))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return stream, deltas


def test_multibyte_characters_are_held_until_complete():
    stream, deltas = stream_all("añ€b")
    assert deltas[:6] == ["a", "", "ñ", "", "", "€"]
    assert "".join(deltas) == stream.text == "añ€b"


def test_stop_strings_cut_the_text_and_their_prefixes_wait():
    stream, deltas = stream_all("x = 1\n\nUser: hi", stop=("\n\nUser:",))
    assert stream.stopped and stream.text == "x = 1"
    assert "".join(deltas) == "x = 1"
    _, deltas = stream_all("a\n\nb", stop=("\n\nUser:",))  # a prefix that never completes
    assert deltas[1:3] == ["", ""] and "".join(deltas) == "a\n\nb"


def admit_all(scheduler, place=lambda slot, request: True):
    admitted = []
    while (pair := scheduler.admit_next(place)) is not None:
        admitted.append(pair)
    return admitted


def test_scheduler_fills_free_slots_in_arrival_order():
    scheduler = SlotScheduler(2)
    for name in "abc":
        scheduler.enqueue(name)
    assert admit_all(scheduler) == [(0, "a"), (1, "b")]
    assert admit_all(scheduler) == [] and scheduler.waiting == 1
    scheduler.release(0)
    assert admit_all(scheduler) == [(0, "c")]
    assert scheduler.busy and scheduler.drain() == []


def test_scheduler_admits_no_one_past_a_request_without_room():
    """Arrival order holds: a request the cache can't hold yet stops the later ones too."""
    scheduler = SlotScheduler(3)
    for name in ("a", "big", "c"):
        scheduler.enqueue(name)
    assert admit_all(scheduler, lambda slot, request: request != "big") == [(0, "a")]
    assert scheduler.waiting == 2
    assert admit_all(scheduler) == [(1, "big"), (2, "c")]
