"""Built-in growth plugins: function-preserving operators and the schedules that fire them.

Importing this package registers the operators (`growth_operator`) and schedules
(`growth_schedule`); the public API for trainers, scripts and user plugins is re-exported here.
"""

from plugins.growth import operators, schedules  # noqa: F401 - imported to register
from plugins.growth.apply import Growth, param_shapes
from plugins.growth.build import build_schedule, plan_growth
from plugins.growth.config import GrowthConfig, GrowthStage
from plugins.growth.operator import (
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
from plugins.growth.schedules import GrowthSchedule
from plugins.growth.values import GAIN, READ, WRITE, Values

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
