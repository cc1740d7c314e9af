"""Live growth under one process, FSDP2, TP and PP with train_configs/debug_growth.toml: its five
operators (deepen, widen_ffn, add_heads, widen_hidden, clone_width), moved to steps 1-5, each
leave the loss on a fixed batch unchanged (they are exact), training goes on at the grown shape,
and a run killed after growing resumes grown."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from plugins.inference.loading import load_model
from tests.conftest import REPO, losses, run_training

CONFIG = "debug_growth.toml"
CRASH = [sys.executable, str(Path(__file__).parents[1] / "checkpoint" / "crash_train.py")]
OPS = ["deepen", "widen_ffn", "add_heads", "widen_hidden", "clone_width"]
STEPS = len(OPS) + 1


def growth_overrides(**changed_params: dict) -> list[str]:
    """The config's stages at steps 1, 2, ... (an op's params replaced by `changed_params[op]`),
    then one more step at the final shape."""
    tables = []
    for step, stage in enumerate(load_config(REPO / "train_configs" / CONFIG).growth.stages, 1):
        params = changed_params.get(stage.op, stage.params)
        inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in params.items())
        tables.append(f'{{ at_step = {step}, op = "{stage.op}", params = {{ {inline} }} }}')
    return [
        f"--training.steps={STEPS}",
        "--checkpoint.interval=2",
        f"--growth.stages=[{', '.join(tables)}]",
    ]


GROWTH = growth_overrides()


def growth_events(dump_folder: Path, job: str) -> list[dict]:
    lines = (dump_folder / job / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "growth"]


# (processes, overrides, final (n_layers, dim, ffn_dim, n_heads, n_kv_heads))
LAYOUTS = {
    "single": (1, GROWTH, (6, 384, 1024, 12, 6)),
    "fsdp2": (2, [*GROWTH, "--training.local_batch_size=2"], (6, 384, 1024, 12, 6)),
    # TP over 2 ranks needs an even kv head count: two more GQA groups instead of one.
    "tp": (
        2,
        [*growth_overrides(add_heads={"kv_heads": 2}), "--parallelism.tensor_parallel_degree=2"],
        (6, 384, 1024, 16, 8),
    ),
    "pp": (2, [*GROWTH, "--parallelism.pipeline_parallel_degree=2"], (6, 384, 1024, 12, 6)),
}
SHAPE_KEYS = ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads")


def run_growth(dump_folder: Path, layout: str, **kwargs) -> None:
    nproc, overrides, _ = LAYOUTS[layout]
    run_training(dump_folder, f"grow_{layout}", *overrides, nproc=nproc, config=CONFIG, **kwargs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_growth_preserves_the_loss_and_training_goes_on(dump_folder, layout):
    run_growth(dump_folder, layout, timeout=600)
    job = f"grow_{layout}"
    events = growth_events(dump_folder, job)
    assert [e["op"] for e in events] == OPS
    assert [e["step"] for e in events] == list(range(1, len(OPS) + 1))
    for event in events:
        assert event["loss_after"] == pytest.approx(event["loss_before"], abs=1e-5), event
        assert event["params_after"] > event["params_before"]
    assert sorted(losses(dump_folder, job)) == list(range(1, STEPS + 1))
    saved = json.loads(
        (dump_folder / job / f"checkpoints/step-{STEPS}/model_args.json").read_text()
    )
    assert tuple(saved[key] for key in SHAPE_KEYS) == LAYOUTS[layout][2]


def test_killed_after_growing_resumes_grown(dump_folder):
    # The uninterrupted reference is the single-process run of the test above.
    if not (dump_folder / "grow_single" / "metrics.jsonl").exists():
        run_growth(dump_folder, "single")
    crashed = run_training(
        dump_folder,
        "grow_killed",
        *GROWTH,
        script=[*CRASH, "--kill-after-step", "3"],
        check=False,
        config=CONFIG,
    )
    assert crashed.returncode == -signal.SIGKILL
    resumed = run_training(dump_folder, "grow_killed", *GROWTH, config=CONFIG)
    output = resumed.stdout + resumed.stderr
    # Step 3's checkpoint was re-saved after its growth: the resume builds the grown shape.
    assert "6 layers, dim 128, 6 heads, 3 kv heads" in output and "step-3 at step 3" in output
    straight, after = losses(dump_folder, "grow_single"), losses(dump_folder, "grow_killed")
    assert after[STEPS] == straight[STEPS]
    # No stage fires twice: the resume applies only the two still due.
    assert [e["op"] for e in growth_events(dump_folder, "grow_killed")] == OPS


def test_generate_runs_from_a_grown_fsdp_checkpoint(dump_folder):
    folder = dump_folder / "grow_fsdp2" / "checkpoints" / f"step-{STEPS}"
    if not folder.exists():
        run_growth(dump_folder, "fsdp2")
    loaded = load_model(folder)
    shape = tuple(getattr(loaded.args, key) for key in SHAPE_KEYS)
    assert shape == LAYOUTS["fsdp2"][2]  # built at the grown shape
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
