"""The command line of a training run: a config file, overrides, --print-config, --help."""

import sys
from pathlib import Path

from arbor_titan.config.job import JobConfig
from arbor_titan.config.loader import (
    ConfigError,
    apply_overrides,
    build,
    help_text,
    load_toml_chain,
    parse_overrides,
)

DEFAULT_CONFIG = "train_configs/debug_model.toml"

USAGE = """usage: python -m arbor_titan.train [CONFIG.toml] [--section.key=value ...]
                                    [--print-config]

Trains a model from a TOML config (default: {default}). Any key can be overridden on the
command line as --section.key=value or --section.key value.

Keys:
{keys}
"""


def load_config(config_path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults ← the TOML chain ← `--section.key=value` overrides."""
    raw, origins = ({}, {}) if config_path is None else load_toml_chain(Path(config_path))
    parsed, rest = parse_overrides(overrides or [])
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    apply_overrides(raw, origins, parsed)
    return build(JobConfig, raw, origins)


def parse_cli(argv: list[str]) -> tuple[JobConfig, bool]:
    """(config, print_only) from a command line; prints usage and exits on --help."""
    if "--help" in argv or "-h" in argv:
        print(USAGE.format(default=DEFAULT_CONFIG, keys=help_text(JobConfig)))
        sys.exit(0)
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    config_path = DEFAULT_CONFIG
    if argv and not argv[0].startswith("--"):
        config_path, argv = argv[0], argv[1:]
    elif argv[:1] == ["--config"] or (argv and argv[0].startswith("--config=")):
        config_path = argv[0].split("=", 1)[1] if "=" in argv[0] else argv[1]
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    return load_config(config_path, argv), print_only
