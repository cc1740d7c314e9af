"""The built-in context schedules: `constant`, `warmup` (sequence-length warmup) and `stages`
(staged extension, optionally after a warmup)."""

import math
from dataclasses import dataclass

from arbor_titan.config.fields import REQUIRED, option
from arbor_titan.context.schedule import (
    PARAMS_KEY,
    ContextSchedule,
    ContextShape,
    ScheduleParamError,
)
from arbor_titan.models.arbor.rope import check_rope_scaling, scaling_name
from arbor_titan.registry import register

PACINGS = ("linear", "root")


@register("context_schedule", "constant")
class ConstantSchedule(ContextSchedule):
    """Every step at the configured shape."""

    def shape(self, step: int) -> ContextShape:
        return self.shape_for(self.base.seq_len, self.base.rope)

    def shapes(self) -> list[ContextShape]:
        return [self.shape(0)]


@dataclass
class WarmupParams:
    steps: int = option(REQUIRED, "Steps over which the length rises to training.seq_len.", ge=1)
    start_seq_len: int = option(64, "The first steps' sequence length.", ge=1)
    pacing: str = option(
        "linear", "How the length rises: 'linear' in the step, or 'root' (its square root)."
    )
    multiple_of: int = option(
        64, "Warmup lengths are rounded down to a multiple of this (kernel tile sizes).", ge=1
    )


class Warmup:
    """Sequence-length warmup (Li, Zhang & He, NeurIPS 2022): from `start_seq_len` to `end` over
    `steps` steps, `linear` or `root` (faster early) in the step.

    Lengths are rounded down to a multiple of `multiple_of` (64 by default) because attention and
    matmul kernels work in tiles of 64 or 128 positions: a length between two multiples pays for
    the next tile anyway, and fewer distinct lengths mean fewer compiled shapes. `start_seq_len`
    is itself a multiple, so no length falls below it.
    """

    def __init__(self, params: WarmupParams, end: int, key: str):
        self.params, self.end = params, end
        if params.pacing not in PACINGS:
            raise ScheduleParamError(
                f"{key}pacing", f"unknown pacing {params.pacing!r}; known: {', '.join(PACINGS)}"
            )
        start = params.start_seq_len
        if start % params.multiple_of:
            raise ScheduleParamError(
                f"{key}start_seq_len",
                f"{start} is not a multiple of multiple_of={params.multiple_of}",
            )
        if start > end:
            raise ScheduleParamError(
                f"{key}start_seq_len", f"{start} is longer than training.seq_len={end}"
            )

    def seq_len(self, step: int) -> int:
        p = self.params
        if step >= p.steps:
            return self.end
        fraction = step / p.steps
        if p.pacing == "root":
            fraction = math.sqrt(fraction)
        length = p.start_seq_len + (self.end - p.start_seq_len) * fraction
        return min(self.end, int(length) // p.multiple_of * p.multiple_of)

    def seq_lens(self, until: int | None = None) -> list[int]:
        """The lengths of steps before `until` (default: every step)."""
        last = self.params.steps if until is None else min(until - 1, self.params.steps)
        return sorted({self.seq_len(step) for step in range(last + 1)})


@register("context_schedule", "warmup")
class WarmupSchedule(ContextSchedule):
    """Sequence-length warmup to `training.seq_len` (see `Warmup`), then that length."""

    Params = WarmupParams

    def __init__(
        self, base: ContextShape, params: WarmupParams, keep_tokens_per_step: bool = False
    ):
        super().__init__(base, params, keep_tokens_per_step)
        self.warmup = Warmup(params, base.seq_len, key="")

    def shape(self, step: int) -> ContextShape:
        return self.shape_for(self.warmup.seq_len(step), self.base.rope)

    def shapes(self) -> list[ContextShape]:
        return [self.shape_for(length, self.base.rope) for length in self.warmup.seq_lens()]


@dataclass
class Stage:
    step: int = option(REQUIRED, "The stage applies after this many optimizer steps.", ge=0)
    seq_len: int = option(REQUIRED, "The stage's sequence length.", ge=1)
    rope: dict = option(
        {},
        "RoPE scaling settings from this stage on, e.g. { type = 'yarn', factor = 4.0, "
        "original_max_seq_len = 256 }; {} keeps the current ones, { type = 'default' } is plain.",
    )


@dataclass
class StagesParams:
    stages: list[Stage] = option(REQUIRED, "[{ step, seq_len, rope }, ...] in step order.")
    warmup: WarmupParams | None = option(
        None, "A sequence-length warmup to training.seq_len before the first stage."
    )


@register("context_schedule", "stages")
class StagesSchedule(ContextSchedule):
    """Staged extension: each stage sets the length from its step on, and its `rope` settings
    replace the current scaling (as Llama 3 and others extend a trained model ×4–8 at a time, the
    scaling's original length set to the previous stage's).

    A run that warms up and then extends gives the `warmup` param (the `warmup` schedule's keys):
    steps before `warmup.steps` follow that warmup to `training.seq_len`, and the stages start
    at or after it. One schedule with an optional warmup, rather than a composition of schedules,
    keeps one state and one place that checks the steps are in order.
    """

    Params = StagesParams

    def __init__(
        self, base: ContextShape, params: StagesParams, keep_tokens_per_step: bool = False
    ):
        super().__init__(base, params, keep_tokens_per_step)
        self.warmup = (
            None if params.warmup is None else Warmup(params.warmup, base.seq_len, "warmup.")
        )
        if not params.stages:
            raise ScheduleParamError("stages", "needs at least one { step, seq_len } stage")
        rope = base.rope
        # Each stage's shape, with the scaling it inherits already resolved.
        self.stage_shapes: list[tuple[int, ContextShape]] = []
        for i, stage in enumerate(params.stages):
            key = f"stages[{i}]"
            previous = params.stages[i - 1].step if i > 0 else -1
            if stage.step <= previous:
                raise ScheduleParamError(
                    f"{key}.step", f"{stage.step} must come after the previous stage's {previous}"
                )
            if self.warmup is not None and stage.step < self.warmup.params.steps:
                raise ScheduleParamError(
                    f"{key}.step",
                    f"{stage.step} falls inside the warmup's {self.warmup.params.steps} steps",
                )
            if stage.rope:
                if "type" not in stage.rope:
                    raise ScheduleParamError(
                        f"{key}.rope",
                        "needs a 'type' naming a rope_scaling plugin ('default': plain)",
                    )
                check_rope_scaling(stage.rope, f"{PARAMS_KEY}.{key}.rope")
                rope = dict(stage.rope) if scaling_name(stage.rope) else None
            self.stage_shapes.append((stage.step, self.shape_for(stage.seq_len, rope)))

    def shape(self, step: int) -> ContextShape:
        current = None
        for start, shape in self.stage_shapes:
            if step >= start:
                current = shape
        if current is not None:
            return current
        length = self.base.seq_len if self.warmup is None else self.warmup.seq_len(step)
        return self.shape_for(length, self.base.rope)

    def shapes(self) -> list[ContextShape]:
        first_stage = self.stage_shapes[0][0]
        if self.warmup is not None:
            before = self.warmup.seq_lens(until=first_stage)
        else:
            before = [self.base.seq_len] if first_stage > 0 else []
        return [self.shape_for(length, self.base.rope) for length in before] + [
            shape for _, shape in self.stage_shapes
        ]
