"""From the `[growth]` section to the objects a trainer uses: its schedule and, checked before
step 0, the `Growth` of every stage (each built on the args the previous stage produces)."""

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError
from arbor_titan.config.params import parse_params
from arbor_titan.growth.apply import Growth
from arbor_titan.growth.config import GrowthConfig
from arbor_titan.growth.operator import ParamError
from arbor_titan.growth.schedule import GrowthSchedule
from arbor_titan.models.arbor.args import ArborArgs


def build_schedule(cfg: GrowthConfig) -> GrowthSchedule:
    """The `growth_schedule` named by `growth.schedule`, with its checked params."""
    try:
        cls = registry.get("growth_schedule", cfg.schedule)
    except registry.PluginError as err:
        raise ConfigError(f"growth.schedule: {err}") from None
    params = parse_params(cls.Params, cfg.schedule_params, "growth.schedule_params", cfg.schedule)
    try:
        return cls(cfg.stages, params)
    except ParamError as err:
        raise ConfigError(f"growth.schedule_params.{err.key}: {cfg.schedule}: {err}") from None


def plan_growth(cfg: GrowthConfig, args: ArborArgs) -> list[Growth]:
    """One `Growth` per stage, chained: a bad op, param or shape fails here, not at step 2000."""
    plan = []
    for i, stage in enumerate(cfg.stages):
        growth = Growth.create(
            stage.op,
            args,
            stage.params,
            seed=cfg.seed + i,
            where=f"growth.stages[{i}]",
            init=cfg.init,
        )
        plan.append(growth)
        args = growth.new_args
    return plan
