"""Constructor-argument checks shared by the synthesizers (fail early, name the argument, echo the value)."""

from __future__ import annotations

from collections.abc import Sequence


def check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """Check a ``(min, max)`` pair (a list from YAML is fine) within ``[low, high]``; return it as a tuple."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        msg = f"{name} must be a (min, max) pair of numbers, got {value!r}"
        raise ValueError(msg) from None
    if not (low <= lo <= hi <= high):
        msg = f"{name} must satisfy {low} <= min <= max <= {high}, got {value!r}"
        raise ValueError(msg)
    return lo, hi


def check_int_range(name: str, value: Sequence[int], low: int, high: int) -> tuple[int, int]:
    """Like :func:`check_range` for integers."""
    lo, hi = check_range(name, value, low, high)
    if lo != int(lo) or hi != int(hi):
        msg = f"{name} must hold integers, got {value!r}"
        raise ValueError(msg)
    return int(lo), int(hi)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        msg = f"{name} must be one of {tuple(choices)}, got {value!r}"
        raise ValueError(msg)
    return value


def check_bool(name: str, value: bool) -> bool:
    """Check a flag: ``True`` or ``False`` (not ``1``, ``"no"`` or ``None``, which YAML and typos produce)."""
    if not isinstance(value, bool):
        msg = f"{name} must be True or False, got {value!r}"
        raise ValueError(msg)
    return value
