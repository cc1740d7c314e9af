"""The built-in context schedules: the shape of each step, the shapes they list, their checks,
and `[context]` errors that name the key and the registered names."""

from dataclasses import dataclass

import pytest
import tomllib

from arbor_titan.config.loader import ConfigError, build
from arbor_titan.context.build import build_context_schedule
from arbor_titan.context.config import ContextConfig
from arbor_titan.context.schedule import ContextShape


@dataclass
class Root:
    context: ContextConfig


def schedule_from(toml: str, seq_len: int = 256, batch: int = 8):
    cfg = build(Root, tomllib.loads(toml), {}).context
    return build_context_schedule(cfg, seq_len, batch)


def lengths(schedule, steps: int) -> list[int]:
    return [schedule.shape(step).seq_len for step in range(steps)]


def test_constant_is_the_configured_shape_with_the_initial_scaling():
    schedule = schedule_from('[context]\nrope_scaling = "linear"\nrope_params = { factor = 4.0 }')
    expected = ContextShape(256, 8, {"type": "linear", "factor": 4.0})
    assert schedule.shape(0) == schedule.shape(10_000) == expected
    assert schedule.shapes() == [expected] and schedule.max_seq_len == 256


@pytest.mark.parametrize(
    ("pacing", "expected"),
    [
        # 64 + 192·s/6 rounded down to 64: 64, 96→64, 128, 160→128, 192, 224→192, then 256.
        ("linear", [64, 64, 128, 128, 192, 192, 256, 256]),
        # 64 + 192·sqrt(s/6): 64, 142→128, 174→128, 199→192, 220→192, 239→192, then 256.
        ("root", [64, 128, 128, 192, 192, 192, 256, 256]),
    ],
)
def test_warmup_paces_rounds_down_to_the_multiple_and_ends_at_training_seq_len(pacing, expected):
    schedule = schedule_from(
        f'[context]\nschedule = "warmup"\n'
        f'schedule_params = {{ start_seq_len = 64, steps = 6, pacing = "{pacing}" }}'
    )
    assert lengths(schedule, 8) == expected
    assert sorted(s.seq_len for s in schedule.shapes()) == sorted(set(expected))
    assert {s.local_batch_size for s in schedule.shapes()} == {8}


def test_warmup_never_goes_below_the_multiple_nor_past_an_unaligned_end():
    schedule = schedule_from(
        '[context]\nschedule = "warmup"\n'
        "schedule_params = { start_seq_len = 32, steps = 4, multiple_of = 32 }",
        seq_len=100,
    )
    # 32 + 68·s/4: 32, 49→32, 66→64, 83→64, then the configured 100 (not a multiple of 32).
    assert lengths(schedule, 5) == [32, 32, 64, 64, 100]
    assert schedule.max_seq_len == 100


def test_keep_tokens_per_step_scales_the_batch_inversely():
    schedule = schedule_from(
        '[context]\nschedule = "warmup"\nkeep_tokens_per_step = true\n'
        "schedule_params = { start_seq_len = 64, steps = 2 }"
    )
    shapes = [schedule.shape(step) for step in range(3)]
    assert [(s.seq_len, s.local_batch_size) for s in shapes] == [(64, 32), (128, 16), (256, 8)]
    assert {s.seq_len * s.local_batch_size for s in schedule.shapes()} == {2048}


STAGES = """
[context]
schedule = "stages"
rope_scaling = "linear"
rope_params = { factor = 2.0 }
[context.schedule_params]
warmup = { start_seq_len = 64, steps = 2 }
stages = [
    { step = 3, seq_len = 384 },
    { step = 5, seq_len = 512, rope = { type = "linear", factor = 8.0 } },
    { step = 7, seq_len = 128, rope = { type = "default" } },
]
"""


def test_stages_after_a_warmup_replace_the_scaling_at_each_stage():
    schedule = schedule_from(STAGES)
    initial, bigger = {"type": "linear", "factor": 2.0}, {"type": "linear", "factor": 8.0}
    expected = [
        (64, initial),  # warmup
        (128, initial),
        (256, initial),  # training.seq_len once the warmup is over
        (384, initial),  # stage 0 keeps the current scaling
        (384, initial),
        (512, bigger),  # stage 1 replaces it
        (512, bigger),
        (128, None),  # stage 2: back to plain RoPE
    ]
    assert [(schedule.shape(s).seq_len, schedule.shape(s).rope) for s in range(8)] == expected
    assert sorted(s.seq_len for s in schedule.shapes()) == [64, 128, 128, 256, 384, 512]
    assert schedule.max_seq_len == 512


def test_a_stage_at_step_0_replaces_the_starting_shape():
    schedule = schedule_from(
        '[context]\nschedule = "stages"\n'
        "schedule_params = { stages = [{ step = 0, seq_len = 64 }] }"
    )
    assert schedule.shape(0).seq_len == 64 and schedule.shapes() == [ContextShape(64, 8, None)]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('schedule = "nope"', "context.schedule: unknown context_schedule 'nope'; registered: "
         "constant, stages, warmup"),
        ('rope_scaling = "nope"', "context.rope_scaling: unknown rope_scaling 'nope'; registered:"),
        ('rope_scaling = "linear"\nrope_params = { factor = 2.0, facter = 1.0 }',
         "unknown key 'context.rope_params.facter'"),
        ('schedule = "warmup"\nschedule_params = { steps = 4, pacng = "root" }',
         "unknown key 'context.schedule_params.pacng'; did you mean "
         "'context.schedule_params.pacing'"),
        ('schedule = "warmup"\nschedule_params = { start_seq_len = 64 }',
         "context.schedule_params.steps: required by warmup"),
        ('schedule = "warmup"\nschedule_params = { steps = 0 }',
         "context.schedule_params.steps must be >= 1, got 0"),
        ('schedule = "stages"\nschedule_params = { stages = [{ step = 4, seq_len = 0 }] }',
         "context.schedule_params.stages[0].seq_len must be >= 1, got 0"),
        ('schedule = "warmup"\nschedule_params = { steps = 4, pacing = "cubic" }',
         "context.schedule_params.pacing: warmup: unknown pacing 'cubic'; known: linear, root"),
        ('schedule = "warmup"\nschedule_params = { steps = 4, start_seq_len = 100 }',
         "context.schedule_params.start_seq_len: warmup: 100 is not a multiple of "
         "multiple_of=64"),
        ('schedule = "warmup"\nschedule_params = { steps = 4, start_seq_len = 512 }',
         "context.schedule_params.start_seq_len: warmup: 512 is longer than training.seq_len=256"),
        ('schedule = "stages"\nschedule_params = { stages = [{ step = 4, seq_len = 64 }, '
         "{ step = 4, seq_len = 128 }] }",
         "context.schedule_params.stages[1].step: stages: 4 must come after the previous "
         "stage's 4"),
        ('schedule = "stages"\nschedule_params = { warmup = { steps = 8 }, '
         "stages = [{ step = 4, seq_len = 64 }] }",
         "context.schedule_params.stages[0].step: stages: 4 falls inside the warmup's 8 steps"),
        ('schedule = "stages"\nschedule_params = { warmup = { steps = 8, pace = "root" }, '
         "stages = [{ step = 9, seq_len = 64 }] }",
         "unknown key 'context.schedule_params.warmup.pace'"),
        ('schedule = "stages"\nschedule_params = { stages = [{ step = 4, seq_len = 64, '
         'rope = { type = "nope" } }] }',
         "context.schedule_params.stages[0].rope.type: unknown rope_scaling 'nope'; registered:"),
        ('schedule = "stages"\nschedule_params = { stages = [{ step = 4, seq_len = 64, '
         "rope = { factor = 2.0 } }] }",
         "context.schedule_params.stages[0].rope: stages: needs a 'type'"),
        ('schedule = "stages"\nkeep_tokens_per_step = true\n'
         "schedule_params = { stages = [{ step = 4, seq_len = 192 }] }",
         "context.keep_tokens_per_step: a micro-batch of training.seq_len=256 x "
         "training.local_batch_size=8 = 2048 tokens can't be cut into sequences of the "
         "schedule's length 192"),
        ('schedule = "stages"\nkeep_tokens_per_step = true\n'
         "schedule_params = { stages = [{ step = 4, seq_len = 4096 }] }",
         "length 4096"),
    ],
)  # fmt: skip
def test_bad_context_settings_are_one_line_errors_naming_the_key(toml, message):
    with pytest.raises(ConfigError) as err:
        schedule_from(f"[context]\n{toml}")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_scaling_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        schedule_from('[context]\nrope_scaling = "nope"')
    registered = str(err.value).split("registered: ")[1].split(", ")
    assert {"linear", "ntk", "dynamic_ntk", "yarn", "llama3"} <= set(registered)
