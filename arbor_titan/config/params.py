"""Plugin parameters (growth operators and schedules, context schedules, RoPE scalings): a TOML
table checked against the plugin's `Params` dataclass, with errors that name the full key."""

from typing import Any

from arbor_titan.config.loader import build_section


def parse_params(cls: type, raw: dict, where: str, owner: str) -> Any:
    """`cls(**raw)` with the config loader's type and range checks; `where` is the table's dotted
    path and `owner` the plugin's name, both for the messages."""
    return build_section(where, cls, raw, {}, owner)
