"""Live growth under one process, FSDP2, TP and PP: the loss on a fixed batch is unchanged by an
exact operator, training goes on, and a run killed after growing resumes grown."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.inference.loading import load_model
from tests.conftest import REPO, losses, run_training

CRASH = [sys.executable, str(Path(__file__).parents[1] / "checkpoint" / "crash_train.py")]
GROWTH = [
    "--training.steps=4",
    "--checkpoint.interval=2",
    "--growth.enable=true",
    '--growth.stages=[{at_step = 2, op = "deepen", params = { layers = [1, 3] }}, '
    '{at_step = 3, op = "widen_ffn", params = { ffn_dim = 512, mode = "split" }}]',
]


def growth_events(dump_folder: Path, job: str) -> list[dict]:
    lines = (dump_folder / job / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "growth"]


LAYOUTS = {
    "single": (1, []),
    "fsdp2": (2, ["--training.local_batch_size=2"]),
    "tp": (2, ["--parallelism.tensor_parallel_degree=2"]),
    "pp": (2, ["--parallelism.pipeline_parallel_degree=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_growth_preserves_the_loss_and_training_goes_on(dump_folder, layout):
    nproc, overrides = LAYOUTS[layout]
    job = f"grow_{layout}"
    run_training(dump_folder, job, *GROWTH, *overrides, nproc=nproc, timeout=600)
    events = growth_events(dump_folder, job)
    assert [e["op"] for e in events] == ["deepen", "widen_ffn"]
    assert [e["step"] for e in events] == [2, 3]
    for event in events:
        assert event["loss_after"] == pytest.approx(event["loss_before"], abs=1e-5)
        assert event["params_after"] > event["params_before"]
    assert sorted(losses(dump_folder, job)) == [1, 2, 3, 4]
    saved = json.loads((dump_folder / job / "checkpoints/step-4/model_args.json").read_text())
    assert (saved["n_layers"], saved["ffn_dim"]) == (6, 512)


def test_killed_after_growing_resumes_grown(dump_folder):
    # The uninterrupted reference is the single-process run of the test above.
    if not (dump_folder / "grow_single" / "metrics.jsonl").exists():
        run_training(dump_folder, "grow_single", *GROWTH)
    crashed = run_training(
        dump_folder, "grow_killed", *GROWTH, script=[*CRASH, "--kill-after-step", "3"], check=False
    )
    assert crashed.returncode == -signal.SIGKILL
    resumed = run_training(dump_folder, "grow_killed", *GROWTH)
    output = resumed.stdout + resumed.stderr
    # Step 3's checkpoint was re-saved after its growth: the resume builds the grown shape.
    assert "6 layers" in output and "step-3 at step 3" in output
    straight, after = losses(dump_folder, "grow_single"), losses(dump_folder, "grow_killed")
    assert after[4] == straight[4]
    # Neither stage fires again after the resume.
    assert [e["op"] for e in growth_events(dump_folder, "grow_killed")] == ["deepen", "widen_ffn"]


def test_generate_runs_from_a_grown_fsdp_checkpoint(dump_folder):
    folder = dump_folder / "grow_fsdp2" / "checkpoints" / "step-4"
    if not folder.exists():
        run_training(dump_folder, "grow_fsdp2", *GROWTH, *LAYOUTS["fsdp2"][1], nproc=2)
    loaded = load_model(folder)
    assert (loaded.args.n_layers, loaded.args.ffn_dim) == (6, 512)  # built at the grown shape
    command = [
        sys.executable,
        str(REPO / "scripts/generate.py"),
        "--checkpoint",
        str(folder),
        "--prompt",
        "def f(",
        "--temperature=0",
        "--max-new-tokens=8",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(") and len(result.stdout) > len("def f(\n")
