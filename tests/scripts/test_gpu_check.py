"""scripts/gpu_check.sh on CPU in its plumbing mode (toy sizes, the same steps and summary code),
with a carried wheel installed offline into a temporary folder; and the check's parts that a
GPU run would first exercise: timeouts, the budget, step selection, the comparisons."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
spec = importlib.util.spec_from_file_location("gpu_env", REPO / "scripts/gpu_env.py")
gpu_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_env)

PROBE = "gpu_check_probe"


def build_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, as pip would download one: a module, its METADATA (one met
    requirement, one for an extra that must be ignored), WHEEL and a hashed RECORD."""
    info = f"{PROBE}-1.0.dist-info"
    files = {
        f"{PROBE}/__init__.py": "ANSWER = 42\n",
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n"
            "Requires-Dist: torch>=2.0\nRequires-Dist: surely-absent-dist; extra == 'never'\n"
        ),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{PROBE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def test_plumbing_run_installs_the_wheels_runs_the_steps_and_writes_the_summary(tmp_path):
    wheels, out, work = tmp_path / "wheels", tmp_path / "out", tmp_path / "work"
    wheels.mkdir()
    build_wheel(wheels)
    result = subprocess.run(
        [
            "bash",
            "scripts/gpu_check.sh",
            "--plumbing",
            "--only",
            "env,bench_bf16_eager,bench_long_context",
            "--wheels",
            str(wheels),
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "GPU_CHECK_PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # What comes back from a device run: three files, directly in the output folder.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "runs.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "plumbing" and summary["ok"]
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("env", "ok"),
        ("bench_bf16_eager", "ok"),
        ("bench_long_context", "ok"),
    ]
    run = summary["runs"]["bench_bf16_eager"]
    assert run["step"] == 2 and run["tokens_per_second"] > 0 and run["loss"] > 0
    env = summary["env"]
    assert env["device"] == "cpu" and env["python_executable"] == sys.executable
    assert env["read_bandwidth_bytes_per_s"] > 0
    # The carried wheel was installed (not found elsewhere), imports, and its requirements hold.
    assert env["carried"] == [{"name": PROBE, "version": "1.0", "unmet": [], "imports": True}]
    log = (out / "gpu_check.log").read_text()
    assert "installed 1 wheels" in log and "== bench_bf16_eager: ok" in log
    assert "gpu_check: passed" in result.stdout
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/env.log", "env.json", "bench/bench_bf16_eager/metrics.jsonl"} <= names


def test_unmet_requirements_of_carried_packages_are_reported(tmp_path):
    info = tmp_path / "needy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: needy\nVersion: 1.0\nRequires-Dist: torch<1\n"
        "Requires-Dist: surely-absent-dist>=1\n"
    )
    (tmp_path / "needy.py").write_text("")
    [entry] = gpu_env.carried_packages(tmp_path)
    assert not entry["imports"]  # tmp_path is not on sys.path: it is not importable here
    assert [u.split(" (")[0] for u in entry["unmet"]] == ["torch<1", "surely-absent-dist>=1"]
    assert "(found nothing)" in entry["unmet"][1]


def runner(tmp_path: Path, budget_s: float) -> "gpu_check.StepRunner":
    log = (tmp_path / "check.log").open("w")
    (tmp_path / "logs").mkdir(exist_ok=True)
    console = gpu_check.Console(log)
    return gpu_check.StepRunner(
        console, tmp_path / "logs", dict(os.environ), time.monotonic() + budget_s
    )


def test_a_step_past_its_timeout_is_stopped_and_the_budget_skips_the_rest(tmp_path):
    steps = runner(tmp_path, budget_s=3)
    started = time.monotonic()
    steps.run(gpu_check.Step("hangs", ["sleep", "60"], timeout_s=1))
    steps.run(gpu_check.Step("echoes", ["echo", "hello"], timeout_s=60))
    steps.run(gpu_check.Step("late", ["sleep", "60"], timeout_s=60))  # cut at the budget's end
    steps.run(gpu_check.Step("skipped", ["echo", "never"], timeout_s=60))
    assert time.monotonic() - started < 8
    status = {name: r.status for name, r in steps.results.items()}
    assert status["hangs"] == "timeout" and status["echoes"] == "ok"
    assert status["late"] in ("timeout", "skipped") and status["skipped"] == "skipped"
    assert (tmp_path / "logs" / "echoes.log").read_text() == "hello\n"


def test_background_steps_report_when_they_end(tmp_path):
    steps = runner(tmp_path, budget_s=60)
    steps.start(gpu_check.Step("side", ["sh", "-c", "exit 3"], 60, background=True))
    steps.run(gpu_check.Step("main", ["true"], 60, after=("side",)))
    assert steps.results["side"].status == "failed" and steps.results["side"].returncode == 3


def test_only_names_known_steps(tmp_path):
    steps = gpu_check.plan_steps(gpu_check.PLUMBING_SIZES, tmp_path, tmp_path)
    assert [s.name for s in gpu_check.select(steps, "plan,env")] == ["env", "plan"]
    with pytest.raises(SystemExit, match="unknown steps \\['nope'\\]"):
        gpu_check.select(steps, "env,nope")


def test_the_decode_step_reads_the_last_checkpoint_of_the_bf16_run(tmp_path):
    steps = {s.name: s for s in gpu_check.plan_steps(gpu_check.GPU_SIZES, tmp_path, tmp_path)}
    assert str(tmp_path / "799m/799m_bf16_compile/checkpoints/step-20") in steps["decode"].argv
    assert "--compile" in steps["decode"].argv
    # 16 x 4096 tokens per step on the GPU, compiled where the name says so, bf16 everywhere.
    for name in ("799m_bf16_eager", "799m_float8_rowwise_compile"):
        argv = steps[name].argv
        assert "--training.local_batch_size=16" in argv
        assert "--training.mixed_precision_param=bfloat16" in argv
        assert f"--compile.enable={str(name.endswith('compile')).lower()}" in argv


def test_two_gpus_add_a_context_parallel_run_of_each_attention(tmp_path):
    one_gpu = [s.name for s in gpu_check.plan_steps(gpu_check.GPU_SIZES, tmp_path, tmp_path)]
    steps = gpu_check.plan_steps(gpu_check.GPU_SIZES, tmp_path, tmp_path, gpus=2)
    assert [s.name for s in steps if s.name not in one_gpu] == list(gpu_check.CP_RUNS)
    long_argv = next(s.argv for s in steps if s.name == "bench_long_context")
    for step in steps[-3:-1]:
        attention = step.name.removeprefix("bench_cp2_")
        assert step.argv[1:5] == [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
        ]
        # The one-GPU run's sequences and settings, split over 2 cp ranks.
        assert set(long_argv[3:]) - {"--job.name=bench_long_context"} < set(step.argv)
        assert f"--parallelism.context_parallel_attention={attention}" in step.argv
    runs = {
        "bench_long_context": {"loss": 7.0},
        "bench_cp2_all_gather": {"loss": 7.01},
        "bench_cp2_torch_ring": {"loss": 7.2},
    }
    rows = gpu_check.cp_comparison(runs)
    assert [(r["run"], r["ok"]) for r in rows] == [
        ("bench_cp2_all_gather", True),
        ("bench_cp2_torch_ring", False),  # 2.9% off the one-GPU loss
    ]


def test_comparisons(tmp_path):
    runs = {
        "799m_bf16_compile": {"tokens_per_second": 100.0, "loss": 8.0, "memory_gib": 60.0},
        "799m_float8_tensorwise_compile": {"tokens_per_second": 130.0, "loss": 8.08},
        "799m_float8_rowwise_compile": {"tokens_per_second": 120.0, "loss": 8.4},
    }
    rows = gpu_check.float8_comparison(runs)
    assert [(r["recipe"], round(r["speedup"], 2), r["ok"]) for r in rows] == [
        ("tensorwise", 1.3, True),
        ("rowwise", 1.2, False),  # 5% worse loss
    ]
    log = "compile: 9.0s\nprefill: ...; decode: 255 tokens in 255 steps at 1,234.5 tokens/s (b"
    decode = gpu_check.decode_comparison(log, weight_bytes=2 * 10**9, bandwidth=4e12)
    assert decode["tokens_per_second"] == 1234.5 and decode["roofline_tokens_per_second"] == 2000
    assert decode["roofline_fraction"] == pytest.approx(0.61725)
    plan = {"fits": True, "ranks": [{"memory_bytes": {"total": 80 * 2**30}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    row = gpu_check.plan_comparison(tmp_path / "plan.json", runs, gpu_check.PLANNED_RUNS["plan"][1])
    assert row["estimated_gib"] == 80 and row["799m_bf16_compile_over_estimate"] == 0.75


def test_checkout_plugins_register_without_an_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    gpu_check.register_checkout_plugins(tmp_path)
    [distribution] = importlib.metadata.distributions(path=[str(tmp_path)])
    points = {
        p.name: p.value for p in distribution.entry_points if p.group == "arbor_titan.plugins"
    }
    assert points == {
        "growth": "plugins.growth",
        "context": "plugins.context",
        "inference": "plugins.inference",
    }


def test_a_gpu_run_is_summarized_from_what_its_steps_left(tmp_path):
    """The summary of a full GPU run, from files shaped as its steps write them (the CUDA
    branch of gpu_env.py's report, metrics.jsonl, the checkpoint, the logs, the plan)."""
    from arbor_titan.checkpoint.folders import write_model_args
    from arbor_titan.models.arbor import ArborArgs

    env = {
        "python": "3.12.3",
        "torch": "2.11.0+cu130",
        "torch_cuda": "13.0",
        "device": "cuda",
        "gpu": "NVIDIA H200",
        "flash_attention_built": True,
        "flash_sdp_enabled": True,
        "attention_kernels": ["aten::_scaled_dot_product_flash_attention"],
        "flash_sdp_used": True,
        "read_bandwidth_bytes_per_s": 4.0e12,
        "carried": [],
    }
    (tmp_path / "logs").mkdir()
    (tmp_path / "env.json").write_text(json.dumps(env))
    losses = {
        "799m_bf16_compile": 8.0,
        "799m_float8_tensorwise_compile": 8.04,
        "799m_float8_rowwise_compile": 8.02,
        "bench_bf16_eager": 6.0,
        "bench_long_context": 7.0,
    }
    for name, loss in losses.items():
        run = tmp_path / ("bench" if name.startswith("bench") else "799m") / name
        run.mkdir(parents=True)
        records = [
            {"event": "context", "step": 0},
            {"step": 20, "loss": loss, "tokens_per_second": 1e5, "mfu": 0.4, "memory_gib": 50.0},
        ]
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    checkpoint = tmp_path / "799m/799m_bf16_compile/checkpoints/step-20"
    checkpoint.mkdir(parents=True)
    args = ArborArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256)
    write_model_args(args, checkpoint)
    (tmp_path / "logs/decode.log").write_text("decode: 255 tokens in 255 steps at 1,000.0 tokens/s")
    plan = {"fits": True, "ranks": [{"memory_bytes": {"total": 40 * 2**30}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    plan_long = {"fits": True, "ranks": [{"memory_bytes": {"total": 25 * 2**30}}]}
    (tmp_path / "plan_long.json").write_text(json.dumps(plan_long))
    planned = [*losses, "decode", "plan", "plan_long"]
    results = {name: gpu_check.StepResult(name, "ok") for name in planned}

    summary = gpu_check.summarize("gpu", 400.0, tmp_path, results)
    assert summary.ok and not summary.errors and set(summary.runs) == set(losses)
    # Every weight but the input embedding, in bf16: 2 blocks, the final norm, the output.
    block = 2 * 64 * (64 + 32) + 3 * 64 * 128 + 2 * 64
    assert summary.decode["weight_bytes"] == 2 * (2 * block + 64 + 64 * 256)
    assert summary.plans["plan"]["799m_bf16_compile_over_estimate"] == 50 / 40
    assert summary.plans["plan_long"]["bench_long_context_over_estimate"] == 50 / 25
    text = "\n".join(gpu_check.format_summary(summary))
    assert "machine: NVIDIA H200, torch 2.11.0+cu130 (CUDA 13.0)" in text
    assert "used by the model's attention: True" in text and "4,000.0 GB/s" in text
    assert "float8 rowwise vs bf16 (compiled 799m): 1.00x tokens/s, loss +0.25% ok" in text
    assert "decode (799m bf16, batch 1): 1,000.0 tokens/s" in text
    assert (
        "planner plan_long (no reserve): 25.00 GiB; measured bench_long_context 50.00 GiB" in text
    )
    assert "gpu_check: passed" in text
