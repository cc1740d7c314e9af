"""Model growth: the API that growth plugins are written against, and the trainer's hook.

An operator (`GrowthOperator`, registered as a `growth_operator` plugin) maps a model's args,
tensors and optimizer state to grown ones, one tensor at a time; `Growth` applies it to a state
dict or a checkpoint; a `GrowthSchedule` (`growth_schedule` plugin) decides when each
`[[growth.stages]]` entry fires. The built-in operators and schedules live in plugins/growth/.
"""

from arbor_titan.growth.apply import Growth, param_shapes
from arbor_titan.growth.build import build_schedule, plan_growth
from arbor_titan.growth.config import GrowthConfig, GrowthStage
from arbor_titan.growth.operator import (
    GrowthContext,
    GrowthError,
    GrowthOperator,
    NoParams,
    ParamError,
    layer_name,
    replace_args,
    role_of,
    split_layer_name,
)
from arbor_titan.growth.schedule import GrowthSchedule
from arbor_titan.growth.values import GAIN, READ, WRITE, Values

__all__ = [
    "GAIN",
    "READ",
    "WRITE",
    "Growth",
    "GrowthConfig",
    "GrowthContext",
    "GrowthError",
    "GrowthOperator",
    "GrowthSchedule",
    "GrowthStage",
    "NoParams",
    "ParamError",
    "Values",
    "build_schedule",
    "layer_name",
    "param_shapes",
    "plan_growth",
    "replace_args",
    "role_of",
    "split_layer_name",
]
