"""The `[growth]` section: when the model grows and by which operator.

Each stage is a `[[growth.stages]]` table with fixed keys (`at_step`, `op`) and the operator's
own parameters in one table, `params`, so the config loader type-checks the fixed keys and each
operator (built-in or a user's plugin) checks its own keys against its `Params` dataclass:

    [[growth.stages]]
    at_step = 2000
    op = "deepen"
    params = { layers = [1, 3] }
"""

from dataclasses import dataclass

from arbor_titan.config.fields import REQUIRED, option

INITS = ("operator", "random")


@dataclass
class GrowthStage:
    """One `[[growth.stages]]` table."""

    at_step: int = option(
        REQUIRED,
        "fixed: grow right after this optimizer step; loss_plateau: the earliest such step.",
        ge=1,
    )
    op: str = option("", "growth_operator: deepen, widen_ffn, add_heads, clone_width, ...")
    params: dict = option({}, "The operator's parameters, e.g. { layers = [1, 3] } for deepen.")

    def __post_init__(self) -> None:
        if not self.op:
            raise ValueError("op must name a growth_operator")


@dataclass
class GrowthConfig:
    """The `[growth]` section."""

    enable: bool = option(False, "Grow the model during training at the stages below.")
    schedule: str = option(
        "fixed", "growth_schedule that decides when each stage fires: 'fixed' or 'loss_plateau'."
    )
    schedule_params: dict = option({}, "The schedule's parameters, e.g. { window = 200 }.")
    seed: int = option(0, "Seed of the new random entries; stage i uses seed + i.")
    init: str = option(
        "operator",
        "'operator': grown values as each operator makes them (function-preserving for exact "
        "operators); 'random': only the operators' shapes — old tensors kept in their leading "
        "block, every other entry fresh (the control arm of scripts/bench_growth.py).",
    )
    stages: list[GrowthStage] = option([], "Growth stages in step order ([[growth.stages]]).")
    rewarmup_steps: int = option(
        0,
        "After each stage, ramp the lr from ~0 back to its schedule over this many steps "
        "(0: no ramp); see clone_width's note on Adam.",
        ge=0,
    )

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"growth.init must be one of {INITS}, got {self.init!r}")
        if self.enable and not self.stages:
            raise ValueError("growth.enable is true but no [[growth.stages]] are given")
        for i in range(1, len(self.stages)):
            before, after = self.stages[i - 1].at_step, self.stages[i].at_step
            if after <= before:
                raise ValueError(
                    f"growth.stages[{i}].at_step={after} must be greater than "
                    f"growth.stages[{i - 1}].at_step={before} (stages run in order)"
                )
