"""Config dataclasses from JSON/YAML dictionaries and preset names: one rule for unknown keys, lists and names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def check_keys(cls: type, values: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``values`` that are not fields of dataclass ``cls``."""
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"Unknown {what} keys: {sorted(unknown)}")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], what: str) -> ConfigT:
    """``cls(**values)`` after :func:`check_keys`; JSON lists become tuples (configs are frozen)."""
    check_keys(cls, values, what)
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def preset_of(presets: dict[str, Callable[[], ConfigT]], name: str, what: str) -> ConfigT:
    """The config a preset name stands for; ``ValueError`` naming the known ones otherwise."""
    if name not in presets:
        raise ValueError(f"Unknown {what} preset {name!r}; expected one of {sorted(presets)}")
    return presets[name]()
