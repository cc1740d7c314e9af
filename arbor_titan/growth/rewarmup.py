"""`growth.rewarmup_steps`: after each growth stage the learning rate ramps from ~0 back to its
schedule, linearly over that many steps.

Why: under Adam, whose step ignores the gradient's scale, `clone_width`'s divided weights move n
times faster relative to their size, and new entries start with zero moments (docs/growth.md,
"Optimizer state"); a short ramp lets the moments settle first. The ramp multiplies the
schedule's own factor, so the schedule still ends where it would have. Stateful, so a run
resumed inside the ramp keeps ramping.
"""

import functools
from collections.abc import Callable

from torch.optim.lr_scheduler import LambdaLR


def ramped(factor: Callable[[int], float], start: int, steps: int, index: int) -> float:
    """`factor(index)` times the ramp: 1/(steps+1) at the first step after `start`, then up."""
    return factor(index) * min(1.0, max(0.0, (index - start + 1) / (steps + 1)))


class Rewarmup:
    """The ramp's state, saved in checkpoints (`state_dict`) when `growth.rewarmup_steps` > 0."""

    def __init__(self, steps: int):
        self.steps = steps
        self.start = -1  # the optimizer step after which the last ramp began; -1: none yet

    def begin(self, step: int, scheduler: LambdaLR) -> None:
        """Start a ramp after optimizer step `step` on the (freshly built) scheduler."""
        self.start = step
        self.apply(scheduler)

    def apply(self, scheduler: LambdaLR) -> None:
        """Multiply the scheduler's factors by the ramp and set the next step's lr by them."""
        if not self.steps or self.start < 0 or scheduler.last_epoch >= self.start + self.steps:
            return
        scheduler.lr_lambdas = [
            functools.partial(ramped, factor, self.start, self.steps)
            for factor in scheduler.lr_lambdas
        ]
        lrs = [
            base * factor(scheduler.last_epoch)
            for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)
        ]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() reports, as LambdaLR.step() sets it

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["start"])
