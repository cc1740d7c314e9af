"""Plugins by kind and name: how growth operators, schedules, context schedules, RoPE scalings and
inference engines are chosen from TOML without the core importing any of them.

A plugin module registers its objects with `@register(kind, name)` when imported. Modules are
found through the `arbor_titan.plugins` entry-point group (how the built-ins in `plugins/` and a
user's installed package both arrive) or named in the config: `[plugins] modules = ["my_mod"]`.
"""

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from arbor_titan.config.fields import option

ENTRY_POINT_GROUP = "arbor_titan.plugins"
KINDS = (
    "growth_operator",
    "growth_schedule",
    "context_schedule",
    "rope_scaling",
    "inference_engine",
)

T = TypeVar("T")
_registry: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_discovered = False


@dataclass
class PluginsConfig:
    """The `[plugins]` section."""

    modules: list[str] = option([], "Extra Python modules to import so their plugins register.")


class PluginError(LookupError):
    """An unknown plugin name or kind, or a plugin module that fails to import."""


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: make `obj` available as `name` of `kind` (a later registration must not clash)."""
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")

    def decorate(obj: T) -> T:
        existing = _registry[kind].get(name)
        if existing is not None and existing is not obj:
            raise PluginError(f"{kind} {name!r} is registered twice ({existing!r} and {obj!r})")
        _registry[kind][name] = obj
        return obj

    return decorate


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import every entry-point plugin module (once) and the given modules."""
    global _discovered
    if not _discovered:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry_point.load()
            except Exception as err:
                raise PluginError(
                    f"plugin entry point {entry_point.value!r} failed: {err}"
                ) from err
        _discovered = True
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise PluginError(f"plugins.modules: cannot import {module!r}: {err}") from err


def get(kind: str, name: str) -> Any:
    """The plugin `name` of `kind`; an unknown name lists the registered ones."""
    load_plugins()
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    if name not in _registry[kind]:
        known = ", ".join(sorted(_registry[kind])) or "none"
        raise PluginError(f"unknown {kind} {name!r}; registered: {known}")
    return _registry[kind][name]


def names(kind: str) -> list[str]:
    load_plugins()
    return sorted(_registry[kind])
