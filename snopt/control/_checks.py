"""Validators of the control package's arguments (each names the argument it checks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

#: A constant step size, or a callable of the 0-based update index returning it.
Schedule = Union[float, Callable[[int], float]]  # noqa: UP007 - a runtime alias
Bounds = tuple[float, float]


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number, but got {name}={value!r}.")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, but got {name}={value!r}.")
    return value


def check_momentum(name: str, value: Any) -> float:
    """The running-average momentum, in [0, 1]; ``name`` is the caller's argument."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], but got {name}={value}.")
    return value


def check_max_step(name: str, value: Any) -> float | None:
    """The trust region of one update: a positive number, or None for no limit."""
    if value is None:
        return None
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive number or None, but got {name}={value}.")
    return value


def check_warmup(name: str, value: Any) -> int:
    """The steps before the first estimate: an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, but got {name}={value!r}.")
    return value


def check_schedule(name: str, value: Any) -> Schedule:
    """A positive finite constant, or a callable checked each time it is used."""
    if callable(value):
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"`{name}` must be a positive number or a callable of the update index, but got {name}={value!r}."
        )
    return float(value)


def step_size(name: str, schedule: Schedule, count: int) -> float:
    value = schedule(count) if callable(schedule) else schedule
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"The `{name}` schedule must return a positive number, but returned {value!r}."
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"The `{name}` schedule must return a positive number, but returned {value!r} at update {count}."
        )
    return value


def check_bounds(name: str, bounds: Any) -> Bounds | None:
    """None or ``(low, high)`` with ``low < high``; infinite ends are allowed."""
    if bounds is None:
        return None
    try:
        low, high = bounds
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be None or a pair (low, high), but got {name}={bounds!r}.") from None
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"`{name}` must not contain NaN, but got {name}={bounds!r}.")
    if not low < high:
        raise ValueError(
            f"`{name}` must have its lower bound below its upper bound, but got low={low}, high={high}."
        )
    return low, high
