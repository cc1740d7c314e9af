"""Every numeric option is checked once, by the config loader, against its declared range; NaN
and infinite floats are refused everywhere, with one line naming the key and where it was set."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from arbor_titan.config.cli import load_config
from arbor_titan.config.fields import Bounds
from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import ConfigError, help_text
from arbor_titan.config.params import parse_params
from plugins.growth.operators.clone_width import CloneWidthParams

REPO = Path(__file__).resolve().parents[2]
NUMBERS = (int, float, list[int], list[float])
# Numeric keys with no range to declare: any integer is a valid seed of new growth entries.
UNBOUNDED = {"growth.seed"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optimizer.lr=nan", "optimizer.lr must be > 0, got nan"),
        ("--optimizer.lr=-1e-3", "optimizer.lr must be > 0, got -0.001"),
        ("--optimizer.lr=inf", "optimizer.lr must be a finite number, got inf"),
        ("--optimizer.eps=0", "optimizer.eps must be > 0, got 0.0"),
        ("--optimizer.weight_decay=-inf", "optimizer.weight_decay must be >= 0, got -inf"),
        ("--optimizer.betas=[0.9, nan]", "optimizer.betas[1] must be in [0, 1), got nan"),
        ("--optimizer.betas=[0.9, 1.0]", "optimizer.betas[1] must be in [0, 1), got 1.0"),
        ("--model.norm_eps=-1e-5", "model.norm_eps must be > 0, got -1e-05"),
        ("--model.rope_theta=-10000.0", "model.rope_theta must be > 0, got -10000.0"),
        ("--model.rope_theta=nan", "model.rope_theta must be > 0, got nan"),
        ("--training.steps=0", "training.steps must be >= 1, got 0"),
        ("--training.max_norm=nan", "training.max_norm must be >= 0, got nan"),
        ("--training.seed=-1", "training.seed must be >= 0, got -1"),
        ("--lr_scheduler.warmup_steps=-1", "lr_scheduler.warmup_steps must be >= 0, got -1"),
        (
            "--lr_scheduler.min_lr_factor=1.5",
            "lr_scheduler.min_lr_factor must be in [0, 1], got 1.5",
        ),
        ("--data.val_fraction=1.0", "data.val_fraction must be in [0, 1), got 1.0"),
        ("--tokenizer.vocab_size=100", "tokenizer.vocab_size must be >= 300, got 100"),
        ("--tokenizer.max_sentences=100", "tokenizer.max_sentences must be > 100, got 100"),
        ("--metrics.log_freq=0", "metrics.log_freq must be >= 1, got 0"),
        ("--validation.freq=0", "validation.freq must be >= 1, got 0"),
        ("--checkpoint.load_step=-2", "checkpoint.load_step must be >= -1, got -2"),
        (
            "--parallelism.tensor_parallel_degree=0",
            "parallelism.tensor_parallel_degree must be >= 1, got 0",
        ),
        (
            "--parallelism.pipeline_parallel_split_points=[2, 0]",
            "parallelism.pipeline_parallel_split_points[1] must be >= 1, got 0",
        ),
    ],
)
def test_command_line_value_outside_its_range_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"command line: {message}"


def test_toml_value_outside_its_range_names_the_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[optimizer]\nlr = nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: optimizer.lr must be > 0, got nan"


def test_growth_stage_keys_are_checked_with_their_file(tmp_path):
    path = tmp_path / "grow.toml"
    path.write_text('[[growth.stages]]\nat_step = 0\nop = "deepen"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: growth.stages[0].at_step must be >= 1, got 0"
    path.write_text('[[growth.stages]]\nop = "deepen"\n')
    with pytest.raises(ConfigError, match=r"growth\.stages\[0\]\.at_step: required"):
        load_config(path)


def test_plugin_params_refuse_nan_too():
    with pytest.raises(ConfigError) as err:
        parse_params(
            CloneWidthParams, {"snr_db": float("nan")}, "growth.stages[0].params", "clone_width"
        )
    assert (
        str(err.value) == "config: growth.stages[0].params.snr_db must be a finite number, got nan"
    )
    assert parse_params(CloneWidthParams, {"snr_db": 20}, "p", "clone_width").snr_db == 20.0


def test_values_on_the_bounds_are_accepted():
    cfg = load_config(
        None,
        [
            "--training.max_norm=0",
            "--lr_scheduler.min_lr_factor=1",
            "--data.val_fraction=0",
            "--checkpoint.load_step=-1",
            "--tokenizer.vocab_size=300",
        ],
    )
    assert (cfg.training.max_norm, cfg.lr_scheduler.min_lr_factor) == (0.0, 1.0)


def _numeric_fields() -> list[tuple[str, dataclasses.Field]]:
    found = []
    for section in dataclasses.fields(JobConfig):
        hints = typing.get_type_hints(section.type)
        for f in dataclasses.fields(section.type):
            if hints[f.name] in NUMBERS:
                found.append((f"{section.name}.{f.name}", f))
    return found


def test_every_numeric_option_declares_its_range():
    undeclared = {key for key, f in _numeric_fields() if "bounds" not in f.metadata}
    assert undeclared == UNBOUNDED


def test_every_default_lies_in_its_range():
    for key, f in _numeric_fields():
        bounds: Bounds | None = f.metadata.get("bounds")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for value in default if isinstance(default, list) else [default]:
            assert bounds is None or bounds.admits(value), (key, value, str(bounds))


def test_help_shows_the_range():
    text = help_text(JobConfig)
    assert "optimizer.lr (float > 0, default 0.0008)" in text
    assert "data.val_fraction (float in [0, 1), default 0.02)" in text
    assert "optimizer.betas (list[float] in [0, 1), default [0.9, 0.95])" in text


def test_cli_prints_one_line_naming_the_key():
    result = subprocess.run(
        [sys.executable, "-m", "arbor_titan.train", "--optimizer.lr=nan"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: command line: optimizer.lr must be > 0, got nan"
    ]
