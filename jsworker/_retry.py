"""Retry policies: how long a retriable failure waits and when retries stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._duration import Duration, seconds
from ._errors import ConfigError

MIN_RETRY_AFTER = 0.1
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delay before redelivery of a retriable failure, and the attempt budget.

    Args:
        delay: first delay (default 5 s, the seed's ``NakWithDelay(5s)``).
        backoff: ``"fixed"`` (default) or ``"exponential"`` (``delay * factor**(n-1)``).
        factor: exponential growth factor (default 2.0).
        max_delay: cap for exponential delays (default 1 h).
        max_attempts: total attempts before the task is dead-lettered as ``exhausted``
            (default 10; ``0`` = unlimited). Attempts are JetStream deliveries, so a
            worker crash mid-task also consumes one.
    """

    delay: float = 5.0
    backoff: Literal["fixed", "exponential"] = "fixed"
    factor: float = 2.0
    max_delay: float = 3600.0
    max_attempts: int = 10

    @classmethod
    def fixed(cls, delay: Duration = 5.0, *, max_attempts: int = 10) -> RetryPolicy:
        return cls(delay=seconds(delay, name="delay"), max_attempts=max_attempts).validated()

    @classmethod
    def exponential(
        cls,
        delay: Duration = 1.0,
        *,
        factor: float = 2.0,
        max_delay: Duration = 3600.0,
        max_attempts: int = 10,
    ) -> RetryPolicy:
        return cls(
            delay=seconds(delay, name="delay"),
            backoff="exponential",
            factor=factor,
            max_delay=seconds(max_delay, name="max_delay"),
            max_attempts=max_attempts,
        ).validated()

    def validated(self) -> RetryPolicy:
        if self.backoff not in ("fixed", "exponential"):
            raise ConfigError(f"backoff must be 'fixed' or 'exponential', got {self.backoff!r}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 0:
            raise ConfigError(f"max_attempts must be an int >= 0, got {self.max_attempts!r}")
        if self.factor < 1.0:
            raise ConfigError(f"factor must be >= 1.0, got {self.factor}")
        seconds(self.delay, name="delay", maximum=MAX_RETRY_AFTER)
        return self

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if self.backoff == "fixed":
            return self.delay
        return float(min(self.max_delay, self.delay * self.factor ** max(0, attempt - 1)))

    def exhausted(self, attempt: int) -> bool:
        return self.max_attempts > 0 and attempt >= self.max_attempts


def clamp_retry_after(delay: Duration) -> float:
    """``fail_retry_after`` delays are clamped to [100 ms, 1 h] (docs/wire.md)."""
    s = seconds(delay, name="retry delay", allow_zero=True)
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, s))
