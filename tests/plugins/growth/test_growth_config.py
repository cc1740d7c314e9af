"""`[growth]` from TOML, errors that name the key, the registry, chained plans and schedules."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import tomllib
from growth_testing import TINY

from arbor_titan import registry
from arbor_titan.config.loader import ConfigError, build, to_toml
from arbor_titan.growth import Growth, GrowthConfig, build_schedule, plan_growth
from arbor_titan.models.arbor import ArborArgs

BUILT_IN = ["add_heads", "clone_width", "deepen", "stack", "widen_ffn", "widen_hidden"]


@dataclass
class Root:
    growth: GrowthConfig = field(default_factory=GrowthConfig)


def load(text: str) -> GrowthConfig:
    return build(Root, tomllib.loads(text), {}).growth


STAGES = """
[growth]
enable = true

[[growth.stages]]
at_step = 100
op = "deepen"
params = { layers = [0, 1] }

[[growth.stages]]
at_step = 200
op = "clone_width"
[growth.stages.params]
factor = 2
noise = false
"""


def test_stages_load_and_round_trip_through_toml():
    cfg = load(STAGES)
    assert [(s.at_step, s.op, s.params) for s in cfg.stages] == [
        (100, "deepen", {"layers": [0, 1]}),
        (200, "clone_width", {"factor": 2, "noise": False}),
    ]
    assert load(to_toml(Root(cfg))) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[growth.stages]]\nat_step = "x"\nop = "deepen"',
            r"growth.stages\[0\].at_step expects int",
        ),
        ("[[growth.stages]]\nat_step = 5\nopp = 'deepen'", r"unknown key 'growth.stages\[0\].opp'"),
        ("[growth]\nenable = true", "no \\[\\[growth.stages\\]\\] are given"),
        (
            STAGES.replace("at_step = 200", "at_step = 50"),
            r"growth.stages\[1\].at_step=50 must be greater than growth.stages\[0\].at_step=100",
        ),
    ],
)
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        load(text)


def test_registry_holds_the_built_ins_and_unknown_names_list_them():
    assert set(BUILT_IN) <= set(registry.names("growth_operator"))
    assert {"fixed", "loss_plateau"} <= set(registry.names("growth_schedule"))
    with pytest.raises(ConfigError, match=r"growth.op: unknown growth_operator 'deepn'") as err:
        Growth.create("deepn", TINY, {})
    assert ", ".join(BUILT_IN) in str(err.value)


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        (
            "deepen",
            {"layers": [0, 7]},
            r"growth.stages\[0\].params.layers: deepen: \[7\] out of range",
        ),
        ("deepen", {}, r"growth.stages\[0\].params.layers: required by deepen"),
        ("deepen", {"layers": [0], "mode": "x"}, r"unknown key 'growth.stages\[0\].params.mode'"),
        ("deepen", {"layers": "0"}, r"growth.stages\[0\].params.layers expects list\[int\]"),
        ("widen_ffn", {"ffn_dim": 8}, r"params.ffn_dim: widen_ffn: must exceed .* 48"),
        ("clone_width", {"factor": 1}, r"params.factor: clone_width: must be at least 2"),
    ],
)
def test_operator_param_errors_name_the_key(op, params, message):
    with pytest.raises(ConfigError, match=message):
        Growth.create(op, TINY, params, where="growth.stages[0]")


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("add_heads", {}, r"growth.stages\[0\]: add_heads: ArborArgs derives head_dim"),
        ("widen_hidden", {"dim": 64}, r"widen_hidden: .* would change head_dim 8->16"),
    ],
)
def test_head_dim_keeping_ops_need_an_explicit_head_dim(op, params, message):
    if any(f.name == "head_dim" for f in dataclasses.fields(ArborArgs)):
        assert Growth.create(op, TINY, params).new_args.head_dim == TINY.head_dim
        return
    with pytest.raises(ConfigError, match=message):
        Growth.create(op, TINY, params, where="growth.stages[0]")


def test_plan_chains_stages_and_checks_later_ones_before_training():
    plan = plan_growth(load(STAGES), TINY)
    assert [g.new_args.n_layers for g in plan] == [4, 4]
    assert plan[1].args == plan[0].new_args and plan[1].new_args.dim == 64
    bad = load(STAGES.replace("factor = 2", "factor = 0"))
    with pytest.raises(ConfigError, match=r"growth.stages\[1\].params.factor"):
        plan_growth(bad, TINY)


def test_fixed_schedule_fires_each_stage_once_and_resumes():
    schedule = build_schedule(load(STAGES))
    fired = []
    for step in range(1, 300):
        if (index := schedule.due(step)) is not None:
            fired.append((step, index))
            schedule.mark_applied()
    assert fired == [(100, 0), (200, 1)]
    resumed = build_schedule(load(STAGES))
    resumed.load_state_dict({"applied": 1})
    assert resumed.due(150) is None and resumed.due(201) == 1


def plateau(window: int = 10, threshold: float = 1e-3):
    cfg = load(
        STAGES.replace(
            "enable = true",
            "enable = true\nschedule = 'loss_plateau'\n"
            f"schedule_params = {{ window = {window}, threshold = {threshold} }}",
        )
    )
    return build_schedule(cfg)


def test_plateau_schedule_waits_for_a_flat_loss_after_at_step():
    schedule = plateau()
    for step in range(1, 101):  # falling 1% per step: learning, no growth
        schedule.observe(step, 5.0 * 0.99**step)
        assert schedule.due(step) is None
    for step in range(101, 111):  # flat, but not yet a full window of flat losses
        schedule.observe(step, 1.8)
    assert schedule.due(110) == 0
    schedule.mark_applied()
    assert schedule.due(111) is None  # the window restarts after growing
    state = schedule.state_dict()
    resumed = plateau()
    resumed.load_state_dict(state)
    assert resumed.applied == 1 and list(resumed.losses) == []


def test_plateau_flat_before_at_step_waits():
    schedule = plateau()
    for step in range(1, 60):
        schedule.observe(step, 2.0)
    assert schedule.relative_decrease() == 0.0
    assert schedule.due(59) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "schedule = 'plateau'",
            r"growth.schedule: unknown growth_schedule 'plateau'.*loss_plateau",
        ),
        (
            "schedule = 'loss_plateau'\nschedule_params = { window = 1 }",
            r"growth.schedule_params.window: loss_plateau: must be at least 2",
        ),
        ("schedule_params = { window = 3 }", r"unknown key 'growth.schedule_params.window'"),
    ],
)
def test_schedule_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        build_schedule(load(f"[growth]\n{text}"))
