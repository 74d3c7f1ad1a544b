"""Config dataclasses from JSON/YAML dictionaries: one rule for unknown keys and lists."""

from __future__ import annotations

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
