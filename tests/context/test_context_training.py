"""Context schedules in training: a warmup then two extension stages pass every boundary without
losing or repeating a token, and a run resumed after a change repeats the uninterrupted run's
losses — under one process, FSDP2, TP and PP."""

import json
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import losses, run_training

CRASH = [sys.executable, str(Path(__file__).parents[1] / "checkpoint" / "crash_train.py")]
SLOW = {"type": "linear", "factor": 2.0}
SLOWER = {"type": "linear", "factor": 4.0}
# With keep_tokens_per_step, every step holds 64 x 4 tokens per rank: 8 x 32, 4 x 64, 2 x 128.
CONTEXT = [
    "--training.steps=5",
    "--checkpoint.interval=3",
    "--context.keep_tokens_per_step=true",
    "--context.schedule=stages",
    "--context.schedule_params={ warmup = { start_seq_len = 32, steps = 2, multiple_of = 32 }, "
    'stages = [{ step = 3, seq_len = 128, rope = { type = "linear", factor = 2.0 } }, '
    '{ step = 4, seq_len = 128, rope = { type = "linear", factor = 4.0 } }] }',
]
# step -> (seq_len, local_batch_size, rope) from that step on.
SHAPES = {0: (32, 8, None), 2: (64, 4, None), 3: (128, 2, SLOW), 4: (128, 2, SLOWER)}
# Validation past every training length (the RoPE table covers it too), at the last step only.
VALIDATION = [
    "--validation.enable=true",
    "--validation.freq=5",
    "--validation.steps=1",
    "--validation.seq_len=192",
]
LAYOUTS = {
    "fsdp2": (2, ["--training.local_batch_size=2"]),
    "tp": (2, ["--parallelism.tensor_parallel_degree=2"]),
    "pp": (2, ["--parallelism.pipeline_parallel_degree=2"]),
}


def context_events(dump_folder: Path, job: str) -> dict[int, tuple]:
    """step -> (seq_len, local_batch_size, rope) of each `context` event (the last one wins)."""
    lines = (dump_folder / job / "metrics.jsonl").read_text().splitlines()
    events = [r for r in map(json.loads, lines) if r.get("event") == "context"]
    return {e["step"]: (e["seq_len"], e["local_batch_size"], e["rope"]) for e in events}


def saved_progress(folder: Path) -> tuple[dict, dict]:
    """The data loader's and the train state's entries of a checkpoint."""
    state = {
        "dataloader_dp_rank_0": dict.fromkeys(
            ("epoch", "lane_offsets", "seq_len", "batch_size"), 0
        ),
        "train_state": {"step": 0, "tokens_seen": 0},
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))
    return state["dataloader_dp_rank_0"], state["train_state"]


def shape_of_step(step: int) -> tuple:
    """The shape optimizer step `step` (1-based) ran at."""
    return SHAPES[max(start for start in SHAPES if start < step)]


@pytest.fixture(scope="module")
def uninterrupted(dump_folder) -> dict[int, float]:
    run_training(dump_folder, "context_single", *CONTEXT, *VALIDATION)
    return losses(dump_folder, "context_single")


def test_warmup_then_stages_pass_every_boundary_without_losing_a_token(dump_folder, uninterrupted):
    job = dump_folder / "context_single"
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5]
    assert context_events(dump_folder, "context_single") == SHAPES
    tensorboard = EventAccumulator(str(job / "tb"))
    tensorboard.Reload()
    seq_lens = tensorboard.Scalars("events/context/seq_len")
    assert [(e.step, e.value) for e in seq_lens] == [(s, v[0]) for s, v in SHAPES.items()]
    # The loader's lanes moved by exactly each step's windows (seq_len + 1 tokens, the last one
    # a label only), from 0: no token skipped or read twice across the changes.
    loader, train_state = saved_progress(job / "checkpoints" / "step-5")
    shapes = [shape_of_step(step) for step in range(1, 6)]
    assert loader["epoch"] == 0
    assert sum(loader["lane_offsets"]) == sum(batch * (seq_len + 1) for seq_len, batch, _ in shapes)
    assert train_state["tokens_seen"] == sum(batch * seq_len for seq_len, batch, _ in shapes)
    assert (loader["seq_len"], loader["batch_size"]) == (128, 2)
    saved_args = json.loads((job / "checkpoints/step-5/model_args.json").read_text())
    assert saved_args["rope_scaling"] == SLOWER and saved_args["max_seq_len"] == 192
    records = (job / "metrics.jsonl").read_text().splitlines()
    assert any("val_loss" in json.loads(r) for r in records)


def test_killed_after_a_change_resumes_with_the_same_losses(dump_folder, uninterrupted):
    crashed = run_training(
        dump_folder,
        "context_killed",
        *CONTEXT,
        *VALIDATION,
        script=[*CRASH, "--kill-after-step", "4"],
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL
    resumed = run_training(dump_folder, "context_killed", *CONTEXT, *VALIDATION)
    assert "step-3 at step 3" in resumed.stdout + resumed.stderr
    after = losses(dump_folder, "context_killed")
    # Saved after the warmup's change at step 2; steps 4 and 5 cross both stages again.
    assert [after[s] for s in (4, 5)] == pytest.approx([uninterrupted[s] for s in (4, 5)], abs=1e-6)
    assert context_events(dump_folder, "context_killed") == SHAPES


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_after_a_change_repeats_the_losses_under_parallelism(dump_folder, layout):
    nproc, overrides = LAYOUTS[layout]
    job = f"context_{layout}"
    run_training(dump_folder, job, *CONTEXT, *overrides, nproc=nproc)
    straight = losses(dump_folder, job)
    assert context_events(dump_folder, job)[3][:2] == (128, 2 if layout != "fsdp2" else 1)
    run_training(dump_folder, job, *CONTEXT, *overrides, "--checkpoint.load_step=3", nproc=nproc)
    after = losses(dump_folder, job)
    assert [after[s] for s in (4, 5)] == pytest.approx([straight[s] for s in (4, 5)], abs=1e-6)
