"""The one helper every config section uses to declare a key with its help line and valid range."""

from dataclasses import MISSING, dataclass, field
from typing import Any

# The default of a key that has none: the config must set it.
REQUIRED: Any = MISSING


@dataclass(frozen=True)
class Bounds:
    """A numeric key's declared range; each bound is optional. The config loader checks every
    value given in a TOML file or on the command line against it (lists element by element)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def admits(self, value: float) -> bool:
        """False for NaN, which no comparison admits."""
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def __str__(self) -> str:
        """'> 0', '>= 1', 'in [0, 1)'."""
        low = f"{self.gt:g}" if self.gt is not None else None
        low = f"{self.ge:g}" if self.ge is not None else low
        high = f"{self.lt:g}" if self.lt is not None else None
        high = f"{self.le:g}" if self.le is not None else high
        if low is not None and high is not None:
            opening = "(" if self.gt is not None else "["
            closing = ")" if self.lt is not None else "]"
            return f"in {opening}{low}, {high}{closing}"
        if low is not None:
            return f"{'>' if self.gt is not None else '>='} {low}"
        return f"{'<' if self.lt is not None else '<='} {high}"


def option(
    default: Any,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field whose one-line `help` is shown by `--help` and in error messages.

    `gt`/`ge`/`lt`/`le` declare the valid range of a number (or of each number of a list); the
    config loader rejects values outside it, and NaN or infinite floats everywhere, naming the
    key. Mutable defaults (lists, dicts) are copied per instance.
    """
    metadata: dict[str, Any] = {"help": help}
    if (gt, ge, lt, le) != (None, None, None, None):
        metadata["bounds"] = Bounds(gt, ge, lt, le)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)
