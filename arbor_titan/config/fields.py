"""The one helper every config section uses to declare a key with its help line."""

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field whose one-line `help` is shown by `--help` and in error messages.

    Mutable defaults (lists, dicts) are copied per instance.
    """
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
