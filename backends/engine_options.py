"""Typing the string values of `option.X` engine settings (serving.properties and OPTION_* are all strings)."""

from __future__ import annotations

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def coerce_like(value: str, default: object) -> object:
    """Convert `value` to the type of a setting's current value (bool, int, float or str)."""
    if isinstance(default, bool):
        return parse_bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value
