"""The growth schedule protocol: after each optimizer step, is the next stage due?

The trainer calls `observe(step, loss)`, then `due(step)`; when that returns a stage index it
applies that stage and calls `mark_applied()`. The schedule's `state_dict` belongs in every
checkpoint so a resumed run neither repeats nor skips a stage. Implementations are
`growth_schedule` plugins (the built-ins live in plugins/growth/schedules.py).
"""

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from arbor_titan.growth.config import GrowthStage
from arbor_titan.growth.operator import NoParams


class GrowthSchedule(ABC):
    """Subclass, set `Params`, implement `due`; `@register("growth_schedule", name)` it."""

    Params: ClassVar[type] = NoParams

    def __init__(self, stages: list[GrowthStage], params: Any):
        self.stages = list(stages)
        self.params = params
        self.applied = 0

    @property
    def next_stage(self) -> GrowthStage | None:
        return self.stages[self.applied] if self.applied < len(self.stages) else None

    def observe(self, step: int, loss: float) -> None:  # noqa: B027 - optional hook
        """Record the training loss of optimizer step `step` (ignored by default)."""

    @abstractmethod
    def due(self, step: int) -> int | None:
        """The index of the stage to apply right after `step`, or None."""

    def mark_applied(self) -> None:
        """The stage that `due` returned has been applied."""
        self.applied += 1

    def state_dict(self) -> dict:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.applied = int(state["applied"])
