"""TOML → typed config: `extends` inheritance, CLI overrides, and errors that name the key.

One override rule: dataclass defaults ← TOML files (a chain of `extends`) ← command line.
"""

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

try:  # Python >= 3.11
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (pyproject's tomli)
    import tomli as tomllib

from arbor_titan.config.fields import Bounds


class ConfigError(Exception):
    """A mistake in the user's config or command line: shown without a traceback."""


Origins = dict[str, str]  # "section.key" -> where its value came from (file or "command line")


def load_toml_chain(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """Read a TOML file and the files it `extends` (relative to it), deep-merged, child last."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        line = err.object.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} on line {line}); "
            "TOML files must be UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    parent = raw.pop("extends", None)
    merged: dict = {}
    origins: Origins = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a file path string, got {parent!r}")
        merged, origins = load_toml_chain(path.parent / parent, (*_seen, path))
    deep_merge(merged, raw)
    for dotted in _leaf_keys(raw):
        origins[dotted] = str(path)
    return merged, origins


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into `base` in place: tables merge key by key, anything else replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        keys.extend(
            _leaf_keys(value, dotted + ".") if isinstance(value, dict) and not prefix else [dotted]
        )
    return keys


def parse_cli_value(text: str) -> Any:
    """A command-line value read as a TOML value (20, 1e-3, true, [1, 2]); else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(argv: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Split `--section.key=value` / `--section.key value` pairs from the other arguments."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key = arg[2:]
            if "=" in key:
                key, text = key.split("=", 1)
            elif i + 1 < len(argv):
                i += 1
                text = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value")
            overrides.append((key, parse_cli_value(text)))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def apply_overrides(raw: dict, origins: Origins, overrides: list[tuple[str, Any]]) -> None:
    for dotted, value in overrides:
        section, _, key = dotted.partition(".")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--{dotted}: {section} is not a section")
        table[key] = value
        origins[dotted] = "command line"


def build(schema: type, raw: dict, origins: Origins) -> Any:
    """Instantiate the root config dataclass from merged TOML, checking every section and key."""
    sections = {f.name: f for f in dataclasses.fields(schema)}
    values = {}
    for section, table in raw.items():
        if section not in sections:
            raise ConfigError(
                _unknown(
                    section,
                    sections,
                    origins.get(section) or _origin_of(section, origins),
                    "section",
                )
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{origins.get(section, 'config')}: [{section}] must be a table")
        values[section] = build_section(section, sections[section].type, table, origins)
    return schema(**values)


def build_section(section: str, cls: type, table: dict, origins: Origins, owner: str = "") -> Any:
    """`cls(**table)` with every key, type and range checked; `owner` (a plugin's name) is named
    when a required key is missing."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in table:
            by = f" by {owner}" if owner else ""
            raise ConfigError(f"{section}.{name}: required{by} ({f.metadata.get('help', '')})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(
                _unknown(dotted, {f"{section}.{k}" for k in fields}, origins.get(dotted), "key")
            )
        origin = origins.get(dotted, "config")
        kwargs[key] = coerce(value, hints[key], dotted, origin)
        check_numbers(kwargs[key], fields[key].metadata.get("bounds"), dotted, origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[{section}]: {err}") from None


def coerce(value: Any, tp: Any, dotted: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to float, nothing else converts."""
    origin_type = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_type in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
        tp = next(a for a in args if a is not type(None))
        return coerce(value, tp, dotted, origin)
    if origin_type is list:
        if not isinstance(value, list):
            raise _type_error(dotted, origin, tp, value)
        return [coerce(v, args[0], f"{dotted}[{i}]", origin) for i, v in enumerate(value)]
    if origin_type is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(dotted, origin, tp, value)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(dotted, origin, tp, value)
        return build_section(dotted, tp, value, {f"{dotted}.{k}": origin for k in value})
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        tp is str
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and origin == "command line"
    ):
        return str(value)
    if tp is int and isinstance(value, bool):
        raise _type_error(dotted, origin, tp, value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _type_error(dotted, origin, tp, value)
    return value


def check_numbers(value: Any, bounds: Bounds | None, dotted: str, origin: str) -> None:
    """Reject a number outside the key's declared range, and any NaN or infinite float: one
    such value poisons a whole run (a NaN learning rate trains nothing, silently)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_numbers(item, bounds, f"{dotted}[{i}]", origin)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if bounds is not None and not bounds.admits(value):
        raise ConfigError(f"{origin}: {dotted} must be {bounds}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{origin}: {dotted} must be a finite number, got {value!r}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp)


def _type_error(dotted: str, origin: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"{origin}: {dotted} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _origin_of(section: str, origins: Origins) -> str | None:
    return next((v for k, v in origins.items() if k.split(".")[0] == section), None)


def _unknown(name: str, valid: typing.Iterable[str], origin: str | None, what: str) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(valid))}"
    return f"{origin or 'config'}: unknown {what} {name!r}{hint}"


def to_toml(cfg: Any) -> str:
    """The resolved config as TOML text, one table per section (written into every run); it
    loads back equal. Unset (None) values are left out: TOML has no null."""
    return tomli_w.dumps(_without_none(dataclasses.asdict(cfg)))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def help_text(schema: type) -> str:
    """Every section and key with its type, default and one-line description."""
    lines = []
    for section in dataclasses.fields(schema):
        lines.append(f"[{section.name}]")
        hints = typing.get_type_hints(section.type)
        for f in dataclasses.fields(section.type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = json.dumps(default) if default is not None else "unset"
            bounds = f.metadata.get("bounds")
            kind = _type_name(hints[f.name]) + (f" {bounds}" if bounds else "")
            lines.append(f"  {section.name}.{f.name} ({kind}, default {shown})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
