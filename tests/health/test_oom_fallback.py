"""An out-of-memory step falls back (more activation checkpointing, then a split micro-batch)
and replays its batch with the same tokens and losses; past the last fallback the run stops with
the planner's advice. The error is injected by tests/health/fault_train.py after a forward."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from arbor_titan.health.oom import NoFallbackLeft, OomFallback, OutOfMemoryStop, StepSettings
from arbor_titan.metrics.config import MetricsConfig
from arbor_titan.metrics.logger import MetricLogger
from tests.conftest import losses, run_training

FAULT = str(Path(__file__).with_name("fault_train.py"))
STEPS = 4
RUN = [
    f"--training.steps={STEPS}",
    "--checkpoint.enable=false",
    "--metrics.enable_tensorboard=false",
]
TOKENS_PER_STEP = 4 * 64  # FAST_TRAINING's 4 sequences of 64 tokens


def fallback_events(run_dir: Path) -> list[tuple[int, str, int, int, int]]:
    """(step, ac_mode, local_batch_size, gradient_accumulation_steps, tokens_per_step) of each
    fallback in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        (
            r["step"],
            r["ac_mode"],
            r["local_batch_size"],
            r["gradient_accumulation_steps"],
            r["tokens_per_step"],
        )
        for r in records
        if r.get("event") == "oom_fallback"
    ]


def ladder(settings: StepSettings, batch_multiple: int = 1) -> tuple[list[StepSettings], str]:
    """Every fallback from `settings` on, and why the last one is last."""
    rungs = []
    while True:
        try:
            settings = settings.fallback(batch_multiple)
        except NoFallbackLeft as last:
            return rungs, str(last)
        rungs.append(settings)


def test_ladder_checkpoints_more_then_halves_the_micro_batch_keeping_its_tokens():
    rungs, last = ladder(StepSettings("none", 8, 1))
    assert rungs == [
        StepSettings("selective", 8, 1),
        StepSettings("full", 8, 1),
        StepSettings("full", 4, 2),
        StepSettings("full", 2, 4),
        StepSettings("full", 1, 8),
    ]
    assert last == "a micro-batch of 1 sequence can't be halved"
    assert ladder(StepSettings("selective", 2, 3))[0] == [
        StepSettings("full", 2, 3),
        StepSettings("full", 1, 6),
    ]


def test_ladder_stops_at_an_odd_or_pipeline_indivisible_micro_batch():
    assert ladder(StepSettings("full", 6, 1)) == (
        [StepSettings("full", 3, 2)],
        "an odd micro-batch of 3 sequences can't be halved",
    )
    rungs, last = ladder(StepSettings("full", 8, 1), batch_multiple=4)
    assert rungs == [StepSettings("full", 4, 2)]
    assert last.startswith("half the micro-batch, 2, is not divisible by the 4 pipeline")


@pytest.fixture(scope="module")
def reference(dump_folder) -> subprocess.CompletedProcess:
    """A run started at the last fallback that step 2 reaches from the debug run's settings;
    at step 4 it runs out of memory twice: its micro-batch of 2 halves, then nothing is left."""
    return run_training(
        dump_folder,
        "oom_reference",
        *RUN,
        "--activation_checkpoint.mode=full",
        "--training.local_batch_size=2",
        "--training.gradient_accumulation_steps=2",
        "--training.memory_budget_gib=0.001",  # nothing fits: the planner's advice is definite
        script=[sys.executable, FAULT, "--oom-at-step", "4:2"],
        check=False,
    )


def check_replayed(dump_folder: Path, job: str, events: list[tuple], reference_job: str) -> None:
    """The run's fallbacks, each with the step's tokens, and the reference's losses."""
    assert fallback_events(dump_folder / job) == events
    got, want = losses(dump_folder, job), losses(dump_folder, reference_job)
    assert sorted(got) == list(range(1, STEPS + 1))  # step 2 logged once, after its replay
    # Step 1 ran at the configured settings: the same sums up to rounding. Step 2 re-read its
    # windows at the reference's settings (a skipped batch would give another loss), and step 3
    # followed from the same weights and optimizer state. The reference stopped at step 4.
    for step in range(1, STEPS):
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got, want)


def test_out_of_memory_step_replays_at_the_fallback_with_the_same_losses(dump_folder, reference):
    # Step 2 fails three times: selective, then full checkpointing, then half the micro-batch.
    result = run_training(
        dump_folder, "oom_fallback", *RUN, script=[sys.executable, FAULT, "--oom-at-step", "2:3"]
    )
    assert "step 2 ran out of memory (injected out-of-memory error 3 of 3)" in result.stdout
    events = [
        (2, "selective", 4, 1, TOKENS_PER_STEP),
        (2, "full", 4, 1, TOKENS_PER_STEP),
        (2, "full", 2, 2, TOKENS_PER_STEP),
    ]
    check_replayed(dump_folder, "oom_fallback", events, "oom_reference")


def test_two_fsdp_ranks_fall_back_together(dump_folder, reference):
    # Two ranks of 2 sequences: the reference's 4 windows a step, split 1 + 1 after the fallback.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run_training(
        dump_folder,
        "oom_fallback_fsdp",
        *RUN,
        "--activation_checkpoint.mode=full",
        "--training.local_batch_size=2",
        script=[*torchrun, "--nproc_per_node=2", FAULT, "--oom-at-step", "2:1"],
    )
    events = [(2, "full", 1, 2, TOKENS_PER_STEP)]
    check_replayed(dump_folder, "oom_fallback_fsdp", events, "oom_reference")


def test_the_last_fallback_stops_with_the_planners_advice(dump_folder, reference):
    assert reference.returncode == 2, reference.stderr[-3000:]
    assert (
        "error: training stopped: step 4 ran out of memory (injected out-of-memory error 2 of 2) "
        "at activation_checkpoint.mode = 'full', training.local_batch_size = 1, "
        "training.gradient_accumulation_steps = 4, the last fallback (a micro-batch of 1 "
        "sequence can't be halved). The planner at these settings: no mode fits 0.001 GiB per "
        "process (planned peaks: none "
    ) in reference.stderr
    assert "lower training.local_batch_size or training.seq_len" in reference.stderr
    assert fallback_events(dump_folder / "oom_reference") == [(4, "full", 1, 4, TOKENS_PER_STEP)]
    assert sorted(losses(dump_folder, "oom_reference")) == [1, 2, 3]


class ShapedTrainer:
    """The part of a trainer that a context schedule's shape change touches."""

    def __init__(self, seq_len: int, local_batch_size: int):
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.model_args = SimpleNamespace(rope_scaling=None)

    def set_context(self, seq_len: int, local_batch_size: int, rope: dict | None) -> None:
        self.seq_len, self.local_batch_size = seq_len, local_batch_size


def test_a_context_schedules_later_shape_is_split_like_the_fallbacks(tmp_path):
    fallback = OomFallback(MetricLogger(MetricsConfig(enable_tensorboard=False), tmp_path, True))
    # After two halvings at length 64, the schedule moves to length 128 with 8 sequences.
    fallback.split, fallback.shape = 4, (64, 1)
    trainer = ShapedTrainer(128, 8)
    fallback._keep_split(trainer)
    assert (trainer.seq_len, trainer.local_batch_size) == (128, 2)
    fallback._keep_split(trainer)  # the same shape: left as it is
    assert trainer.local_batch_size == 2
    with pytest.raises(OutOfMemoryStop, match="micro-batch of 6 sequences at length 256"):
        fallback._keep_split(ShapedTrainer(256, 6))
