"""Dry run of any config: build each sampled rank's exact model on the meta device under a fake
process group of the config's world size, then report shard shapes, per-GPU memory by category
and the step's FLOPs, time and MFU. `python -m arbor_titan.estimate CONFIG` or
`DRY_RUN=1 ./run_train.sh CONFIG`."""

from arbor_titan.estimate.memory import MemoryEstimate, MemoryOptions
from arbor_titan.estimate.plan import EstimateOptions, Plan, plan
from arbor_titan.estimate.report import format_plan, plan_json

__all__ = [
    "EstimateOptions",
    "MemoryEstimate",
    "MemoryOptions",
    "Plan",
    "format_plan",
    "plan",
    "plan_json",
]
