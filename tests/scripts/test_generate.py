"""scripts/generate.py: streams the engine's text, reports speeds, finds the newest checkpoint,
runs with another RoPE scaling, loads a checkpoint saved by a 4-process FSDP x TP training run,
and runs tensor parallel."""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arbor_titan.models.arbor.rope import rope_cos_sin
from plugins.inference.cli import engine_factory
from plugins.inference.engine import create_engine
from plugins.inference.loading import load_model
from plugins.inference.sampling import SamplingParams
from plugins.inference.tensor_parallel import check_divisible
from tests.conftest import REPO, run_training
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)


def load_script(name: str):
    """A script of scripts/ as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_script("generate")

GREEDY = ["--temperature=0", "--max-new-tokens=12"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    tokenizer = train_tokenizer(root / "tokenizer.model")
    return save_dcp_checkpoint(random_model(tiny_args()), root / "step-3", tokenizer)


@functools.cache
def engine_text(checkpoint: Path, prompt: str, max_new_tokens: int = 12) -> str:
    loaded = load_model(checkpoint)
    engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens))[0].text


def test_streams_the_continuation_and_reports_speeds(checkpoint, capsys):
    prompt = "def f(x):"
    assert generate.main(["--checkpoint", str(checkpoint), "--prompt", prompt, *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert out == prompt + engine_text(checkpoint, prompt) + "\n"
    assert "prefill: " in err and "tokens/s" in err and "decode: 11 tokens in 11 steps" in err


def test_batch_file_prints_each_prompt_with_its_own_completion(checkpoint, tmp_path, capsys):
    prompts = ["import os", "", "class A:", "x = 1"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    argv = ["--checkpoint", str(checkpoint), "--prompt-file", str(tmp_path / "prompts.txt")]
    assert generate.main([*argv, "--batch", *GREEDY]) == 0
    out, err = capsys.readouterr()
    for i, prompt in enumerate(p for p in prompts if p):
        assert f"--- [{i}] (length) ---\n{prompt}{engine_text(checkpoint, prompt)}\n" in out
    assert "batch 3" in err


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--prompt", "x"]) == 2
    assert "no checkpoint in outputs/debug/checkpoints" in capsys.readouterr().err
    (tmp_path / "outputs/debug/checkpoints").mkdir(parents=True)
    assert generate.main(["--prompt", "x"]) == 2
    assert "./run_train.sh" in capsys.readouterr().err


@pytest.mark.slow
def test_loads_a_checkpoint_saved_by_fsdp_x_tp_training(dump_folder):
    # One 4-process run (data_parallel_shard 2 x tensor_parallel 2) covers both shardings in
    # ~20 s; the DCP weights are DTensors sharded on both mesh dimensions.
    run_training(
        dump_folder,
        "inference_fsdp_tp",
        "--training.steps=2",
        "--checkpoint.interval=2",
        "--parallelism.data_parallel_shard_degree=2",
        "--parallelism.tensor_parallel_degree=2",
        "--training.local_batch_size=2",
        nproc=4,
    )
    folder = dump_folder / "inference_fsdp_tp" / "checkpoints" / "step-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts/generate.py"), "--checkpoint", str(folder)]
    command += ["--prompt", "def main(", *GREEDY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "def main(" + engine_text(folder, "def main(") + "\n"
    assert "decode: " in result.stderr


def test_unknown_engine_lists_the_registered_ones(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--prompt", "x", "--engine", "nope", *GREEDY]
    assert generate.main(argv) == 2
    assert "paged_kv" in capsys.readouterr().err


@pytest.fixture
def engines(monkeypatch) -> list:
    """The engines generate.py builds, recorded through its engine factory."""
    built = []

    def recording_factory(name):
        make = engine_factory(name)

        def make_and_record(*args):
            built.append(make(*args))
            return built[-1]

        return make_and_record

    monkeypatch.setattr(generate, "engine_factory", recording_factory)
    return built


LONG = ["--prompt", "def f(x):", "--temperature=0", "--max-new-tokens=80"]  # past 64 positions


def test_rope_override_runs_past_the_training_length_with_its_table(checkpoint, engines, capsys):
    argv = ["--checkpoint", str(checkpoint), *LONG, "--rope-scaling", "yarn", "--rope-factor", "4"]
    assert generate.main([*argv, "--rope-param", "beta_fast=16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f(x):") and "decode: 79 tokens" in err
    assert "note:" not in err  # 85 positions are within the scaled 64 × 4
    forward = engines[0].forward
    scaling = {"type": "yarn", "factor": 4.0, "beta_fast": 16, "original_max_seq_len": 64}
    args = forward.model.args
    assert args.rope_scaling == scaling and args.max_seq_len == 256
    expected = rope_cos_sin(args.head_dim, forward.max_len, args.rope_theta, scaling)
    assert forward.max_len > 64 and torch.equal(forward.rope, expected)


def test_the_checkpoint_scaling_is_used_and_sets_the_context(checkpoint, engines, capsys, tmp_path):
    """Trained at 64 positions with YaRN extending 32 × 4: 85 positions need no note."""
    scaling = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 32}
    tokenizer = checkpoint / "tokenizer.model"
    scaled = save_dcp_checkpoint(
        random_model(tiny_args(rope_scaling=scaling)), tmp_path / "step-1", tokenizer
    )
    assert generate.main(["--checkpoint", str(scaled), *LONG]) == 0
    assert "note:" not in capsys.readouterr().err
    forward = engines[0].forward
    expected = rope_cos_sin(
        forward.head_dim, forward.max_len, forward.model.args.rope_theta, scaling
    )
    assert forward.model.args.rope_scaling == scaling and torch.equal(forward.rope, expected)


def test_without_a_scaling_the_note_names_the_training_length_as_the_context(
    checkpoint, engines, capsys
):
    assert generate.main(["--checkpoint", str(checkpoint), *LONG]) == 0
    assert "exceed the model's context length 64" in capsys.readouterr().err
    forward = engines[0].forward
    expected = rope_cos_sin(forward.head_dim, forward.max_len, forward.model.args.rope_theta)
    assert torch.equal(forward.rope, expected)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rope-scaling", "longrope"], "--rope-scaling: unknown rope_scaling 'longrope'"),
        (["--rope-factor", "2"], "name one with --rope-scaling (dynamic_ntk, linear"),
        (["--rope-scaling", "yarn", "--rope-param", "factor"], "--rope-param: expected KEY=VALUE"),
        (["--rope-scaling", "ntk", "--rope-factor", "0.5"], "--rope-param.factor must be >= 1"),
    ],
)
def test_bad_rope_flags_are_one_line_errors(checkpoint, flags, named, capsys):
    assert generate.main(["--checkpoint", str(checkpoint), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err
    if "unknown" in named:
        assert all(name in err for name in ("dynamic_ntk", "linear", "llama3", "ntk", "yarn"))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "10000000000"], "the KV cache for prompts 1 × --max-new-tokens"),
    ],
)
def test_sizes_that_cannot_run_are_one_line_errors(checkpoint, flags, named, capsys):
    assert generate.main(["--checkpoint", str(checkpoint), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"generate.py: error: {named}") and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["dcp", "pt"])
def test_tensor_parallel_over_two_processes_prints_the_single_process_text(
    checkpoint, weights, tmp_path
):
    """Each process loads its half of every split matrix (from its DCP shard, or by slicing a
    whole .pt file); greedy and seeded sampling give the one-process text token for token."""
    if weights == "pt":
        model = load_model(checkpoint).model
        torch.save(model.state_dict(), tmp_path / "model.pt")
        for name in ("model_args.json", "tokenizer.model"):
            (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
        source, sampling = tmp_path / "model.pt", ["--temperature=0.9", "--seed=5"]
    else:
        source, sampling = checkpoint, ["--temperature=0"]
    argv = ["--checkpoint", str(source), "--prompt", "def main(", "--max-new-tokens=24"]
    argv += sampling
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node=2", str(REPO / "scripts/generate.py")]
    split = subprocess.run(torchrun + argv, capture_output=True, text=True, timeout=180, env=env)
    assert split.returncode == 0, split.stderr[-3000:]
    whole = subprocess.run(
        [sys.executable, str(REPO / "scripts/generate.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert split.stdout == whole.stdout and split.stdout.startswith("def main(")
    assert "tensor parallel over 2" in split.stderr and split.stderr.count("decode: ") == 1


def test_tensor_parallel_needs_whole_heads_per_process():
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        check_divisible(tiny_args(), 4)
    check_divisible(tiny_args(), 2)
