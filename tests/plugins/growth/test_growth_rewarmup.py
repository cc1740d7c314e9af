"""`growth.rewarmup_steps`: the lr ramps back to its schedule after a growth, also across a
resume, and the schedule ends where it would have."""

import pytest
import torch

from arbor_titan.growth.rewarmup import Rewarmup
from arbor_titan.optim.config import LRSchedulerConfig
from arbor_titan.optim.lr_schedule import build_lr_scheduler

LR, TOTAL = 1e-2, 20
CFG = LRSchedulerConfig(warmup_steps=2, decay_type="cosine", min_lr_factor=0.1)


def scheduler_at(step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A fresh scheduler restored to `step`, as the trainer rebuilds one after a growth."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = build_lr_scheduler(optimizer, CFG, TOTAL)
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": step})
    return scheduler


def lrs_from(scheduler, steps: int) -> list[float]:
    """The lr of each of the next `steps` optimizer steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr()[0] == lrs[-1]  # what the trainer logs
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_ramp_multiplies_the_schedule_then_lets_it_go():
    plain = scheduler_at(5)
    expected = [LR * plain.lr_lambdas[0](i) for i in range(5, TOTAL)]
    ramped = scheduler_at(5)
    Rewarmup(3).begin(5, ramped)
    lrs = lrs_from(ramped, TOTAL - 5)
    assert lrs[:3] == pytest.approx([e * k / 4 for e, k in zip(expected, (1, 2, 3))])
    assert lrs[3:] == pytest.approx(expected[3:])  # the schedule itself from then on


def test_a_resume_inside_the_ramp_keeps_ramping():
    rewarmup = Rewarmup(4)
    scheduler = scheduler_at(5)
    rewarmup.begin(5, scheduler)
    before = lrs_from(scheduler, 6)
    resumed, restored = scheduler_at(7), Rewarmup(4)
    restored.load_state_dict(rewarmup.state_dict())
    restored.apply(resumed)
    assert lrs_from(resumed, 4) == pytest.approx(before[2:6])


def test_no_ramp_without_steps_or_growth():
    for rewarmup in (Rewarmup(0), Rewarmup(3)):
        scheduler = scheduler_at(5)
        expected = scheduler.get_last_lr()
        rewarmup.apply(scheduler)  # Rewarmup(3) has not begun: no growth yet
        assert scheduler.get_last_lr() == expected
