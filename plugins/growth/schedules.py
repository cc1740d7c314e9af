"""The built-in growth schedules: `fixed` (the TOML's steps) and `loss_plateau`."""

import math
from collections import deque
from dataclasses import dataclass

from arbor_titan.config.fields import option
from arbor_titan.growth.config import GrowthStage
from arbor_titan.growth.operator import ParamError
from arbor_titan.growth.schedule import GrowthSchedule
from arbor_titan.registry import register


@register("growth_schedule", "fixed")
class FixedSchedule(GrowthSchedule):
    """Each stage fires right after its `at_step` (or the first step past it, after a resume)."""

    def due(self, step: int) -> int | None:
        stage = self.next_stage
        return self.applied if stage is not None and step >= stage.at_step else None


@dataclass
class PlateauParams:
    window: int = option(100, "Steps of training loss the plateau slope is fitted over.")
    threshold: float = option(
        1e-4, "Grow when the loss falls by less than this fraction of itself per step."
    )


@register("growth_schedule", "loss_plateau")
class LossPlateauSchedule(GrowthSchedule):
    """Each stage fires at the first step at or after its `at_step` where the least-squares
    slope of the last `window` losses (all since the previous growth) says the loss falls by less
    than `threshold` of itself per step: a small model that has stopped learning grows then."""

    Params = PlateauParams

    def __init__(self, stages: list[GrowthStage], params: PlateauParams):
        if params.window < 2:
            raise ParamError("window", f"must be at least 2 steps, got {params.window}")
        if params.threshold <= 0:
            raise ParamError("threshold", f"must be positive, got {params.threshold}")
        super().__init__(stages, params)
        self.losses: deque[float] = deque(maxlen=params.window)

    def observe(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.losses.append(float(loss))

    def due(self, step: int) -> int | None:
        stage = self.next_stage
        if stage is None or step < stage.at_step or len(self.losses) < self.params.window:
            return None
        return self.applied if self.relative_decrease() < self.params.threshold else None

    def relative_decrease(self) -> float:
        """Minus the fitted slope of the window's losses, divided by their mean."""
        n = len(self.losses)
        x_mean, y_mean = (n - 1) / 2, sum(self.losses) / n
        covariance = sum((x - x_mean) * (y - y_mean) for x, y in enumerate(self.losses))
        slope = covariance / sum((x - x_mean) ** 2 for x in range(n))
        return -slope / y_mean

    def mark_applied(self) -> None:
        super().mark_applied()
        self.losses.clear()  # the grown model's losses start a new window

    def state_dict(self) -> dict:
        return {**super().state_dict(), "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.losses = deque(state["losses"], maxlen=self.params.window)
