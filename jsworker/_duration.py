"""Durations are accepted as ``float`` seconds or ``timedelta`` and normalised once."""

from __future__ import annotations

import math
from datetime import timedelta

from ._errors import ConfigError

Duration = float | int | timedelta


def seconds(
    value: Duration,
    *,
    name: str,
    minimum: float = 0.0,
    maximum: float | None = None,
    allow_zero: bool = False,
) -> float:
    """Return ``value`` in seconds, refusing negatives, NaN and out-of-range values."""
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be seconds (float) or a timedelta, got {value!r}")
    else:
        s = float(value)
    if math.isnan(s) or math.isinf(s):
        raise ConfigError(f"{name} must be a finite duration, got {value!r}")
    if s == 0 and allow_zero:
        return 0.0
    if s <= 0 or s < minimum:
        raise ConfigError(f"{name} must be > {minimum:g}s, got {s:g}s")
    if maximum is not None and s > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}s, got {s:g}s")
    return s
