"""Adaptive context: sequence-length schedules and RoPE scalings chosen from the `[context]`
section. The API lives here; the built-ins are plugins in plugins/context/.

A `ContextSchedule` (`context_schedule` plugin) answers each step's `ContextShape`: sequence
length, micro-batch and RoPE scaling settings; the trainer follows it through
`arbor_titan.context.callback.ContextCallback`. Scalings are `RopeScaling` plugins
(arbor_titan/models/arbor/rope.py).
"""

from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.config import ContextConfig
from arbor_titan.context.schedule import (
    PARAMS_KEY,
    ContextSchedule,
    ContextShape,
    NoScheduleParams,
    ScheduleParamError,
)

__all__ = [
    "PARAMS_KEY",
    "ContextConfig",
    "ContextSchedule",
    "ContextShape",
    "NoScheduleParams",
    "ScheduleParamError",
    "build_context_schedule",
]
