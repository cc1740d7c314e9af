"""Config: inheritance, both override forms, --print-config, --help and every user error."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from arbor_titan.config.cli import load_config, parse_cli
from arbor_titan.config.loader import ConfigError, to_toml

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_deep_merges_a_chain(tmp_path):
    write(tmp_path / "base.toml", '[training]\nsteps = 10\nseq_len = 64\n[job]\nname = "base"\n')
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.toml", 'extends = "../base.toml"\n[training]\nseq_len = 128\n')
    leaf = write(tmp_path / "sub" / "leaf.toml", 'extends = "mid.toml"\n[job]\nname = "leaf"\n')
    cfg = load_config(leaf)
    assert (cfg.training.steps, cfg.training.seq_len, cfg.job.name) == (10, 128, "leaf")
    assert cfg.training.local_batch_size == 8  # untouched default


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.toml")


def test_both_override_forms(tmp_path):
    path = write(tmp_path / "c.toml", "[training]\nsteps = 10\n")
    cfg = load_config(path, ["--training.steps=20", "--optimizer.lr", "0.5", "--job.name=run7"])
    assert cfg.training.steps == 20
    assert cfg.optimizer.lr == 0.5
    assert cfg.job.name == "run7"
    cfg = load_config(
        path, ["--optimizer.betas=[0.8, 0.9]", "--metrics.enable_tensorboard", "false"]
    )
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.metrics.enable_tensorboard is False


def test_int_widens_to_float_but_nothing_else_converts(tmp_path):
    cfg = load_config(write(tmp_path / "c.toml", "[optimizer]\nlr = 1\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_unknown_section_names_file_and_closest(tmp_path):
    path = write(tmp_path / "c.toml", "[trainig]\nsteps = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "'training'" in str(err.value)


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path / "c.toml", "[training]\nstesp = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "training.stesp" in message and "training.steps" in message


def test_unknown_key_from_command_line(tmp_path):
    with pytest.raises(ConfigError, match="command line.*optimizer.llr.*optimizer.lr"):
        load_config(None, ["--optimizer.llr=1"])


def test_wrong_type_names_key_type_and_value(tmp_path):
    path = write(tmp_path / "c.toml", '[training]\nsteps = "many"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "training.steps" in message and "int" in message and "'many'" in message
    with pytest.raises(ConfigError, match="training.steps expects int.*'abc'"):
        load_config(None, ["--training.steps=abc"])
    with pytest.raises(ConfigError, match="training.steps expects int.*True"):
        load_config(None, ["--training.steps=true"])


def test_invalid_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match="training.mixed_precision_param"):
        load_config(None, ["--training.mixed_precision_param=fp8"])


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nope.toml")):
        load_config(tmp_path / "nope.toml")
    write(tmp_path / "child.toml", 'extends = "gone.toml"\n')
    with pytest.raises(ConfigError, match="gone.toml"):
        load_config(tmp_path / "child.toml")


def test_print_config_round_trips(tmp_path):
    cfg, print_only = parse_cli(
        [str(REPO / "train_configs/debug_model.toml"), "--print-config", "--training.steps", "7"]
    )
    assert print_only
    text = to_toml(cfg)
    reparsed = load_config(write(tmp_path / "resolved.toml", text))
    assert reparsed == cfg
    assert tomllib.loads(text)["training"]["steps"] == 7


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arbor_titan.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_print_config_help_and_clean_errors():
    printed = run_cli("--print-config", "--training.steps=3")
    assert printed.returncode == 0, printed.stderr
    assert tomllib.loads(printed.stdout)["training"]["steps"] == 3

    shown = run_cli("--help")
    assert shown.returncode == 0
    for key in ("training.steps", "optimizer.lr", "data.source", "tokenizer.vocab_size"):
        assert key in shown.stdout

    bad = run_cli("--training.stepz=3")
    assert bad.returncode != 0
    assert "training.steps" in bad.stderr and "Traceback" not in bad.stderr
