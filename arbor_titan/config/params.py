"""Plugin parameters (growth operators and schedules, context schedules, RoPE scalings): a TOML
table checked against the plugin's `Params` dataclass, with errors that name the full key."""

import dataclasses
from typing import Any

from arbor_titan.config.loader import ConfigError, build_section


def parse_params(cls: type, raw: dict, where: str, owner: str) -> Any:
    """`cls(**raw)` with the config loader's type checks; `where` is the table's dotted path and
    `owner` the plugin's name, both for the messages."""
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in raw:
            help_text = f.metadata.get("help", "")
            raise ConfigError(f"{where}.{f.name}: required by {owner} ({help_text})")
    return build_section(where, cls, raw, {})
