"""The lr schedule's shape, its errors, and that its state survives a checkpoint round trip."""

import logging
import math
import pickle

import pytest
import torch

from arbor_titan.optim import LRSchedulerConfig, build_lr_scheduler


def _scheduler(cfg: LRSchedulerConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # lr 1.0, so every lr read back is the schedule's factor itself.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_lr_scheduler(optimizer, cfg, total_steps)


def _lrs(cfg: LRSchedulerConfig, total_steps: int) -> list[float]:
    """The lr at steps 0..total_steps, as the trainer sees it (read, step, scheduler.step)."""
    scheduler = _scheduler(cfg, total_steps)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_starts_above_zero_and_reaches_peak():
    lrs = _lrs(LRSchedulerConfig(warmup_steps=4, decay_type="linear"), 20)
    assert lrs[:5] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0])


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "wsd"])
def test_decay_ends_at_min_lr_factor_and_never_rises(decay_type):
    lrs = _lrs(LRSchedulerConfig(warmup_steps=5, decay_type=decay_type, min_lr_factor=0.1), 50)
    assert lrs[-1] == pytest.approx(0.1)
    after_warmup = lrs[5:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


def test_linear_and_cosine_midpoints():
    linear = _lrs(LRSchedulerConfig(warmup_steps=10, decay_type="linear", min_lr_factor=0.0), 30)
    cosine = _lrs(LRSchedulerConfig(warmup_steps=10, decay_type="cosine", min_lr_factor=0.2), 30)
    assert linear[20] == pytest.approx(0.5)
    assert cosine[20] == pytest.approx(0.2 + 0.8 * 0.5)
    assert cosine[15] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    cfg = LRSchedulerConfig(warmup_steps=10, decay_type="wsd", decay_ratio=0.2, min_lr_factor=0.0)
    lrs = _lrs(cfg, 100)
    assert lrs[10:81] == pytest.approx([1.0] * 71)
    assert lrs[90] == pytest.approx(0.5)
    assert lrs[100] == pytest.approx(0.0)


def test_wsd_decay_never_starts_inside_warmup():
    cfg = LRSchedulerConfig(warmup_steps=8, decay_type="wsd", decay_ratio=0.5, min_lr_factor=0.0)
    lrs = _lrs(cfg, 10)
    assert lrs[8] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.5)


def test_no_warmup_starts_at_peak():
    assert _lrs(LRSchedulerConfig(warmup_steps=0), 10)[0] == pytest.approx(1.0)


def test_warmup_longer_than_training_is_cut_to_the_run_with_a_warning(caplog):
    """A 4-step smoke run of a config with 20 warmup steps runs, and says what it changed."""
    with caplog.at_level(logging.WARNING, logger="arbor_titan"):
        lrs = _lrs(LRSchedulerConfig(warmup_steps=20, decay_type="cosine"), 4)
    assert lrs[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])  # warmup over the 4 steps
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "lr_scheduler.warmup_steps=20 exceeds training.steps=4" in record.getMessage()
    assert _lrs(LRSchedulerConfig(warmup_steps=4), 4)[:4] == lrs[:4]  # as if set to 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"decay_type": "cos"},
            "lr_scheduler.decay_type must be one of 'linear', 'cosine', 'wsd', got 'cos'",
        ),
    ],
)
def test_bad_values_name_their_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        LRSchedulerConfig(**kwargs)


def test_state_dict_round_trip_resumes_the_schedule():
    cfg = LRSchedulerConfig(warmup_steps=3, decay_type="cosine")
    first = _scheduler(cfg, 20)
    for _ in range(7):
        first.optimizer.step()
        first.step()
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert state["lr_lambdas"] == [{}]  # only the step count: the schedule comes from config

    resumed = _scheduler(cfg, 20)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == first.get_last_lr()
    for scheduler in (first, resumed):
        scheduler.optimizer.step()
        scheduler.step()
    assert resumed.get_last_lr() == first.get_last_lr()


def test_scheduler_pickles():
    scheduler = pickle.loads(pickle.dumps(_scheduler(LRSchedulerConfig(), 200)))
    assert scheduler.lr_lambdas[0](0) == pytest.approx(1 / 101)
