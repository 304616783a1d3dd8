"""Counters a worker keeps about itself (read by ``jsworker serve``'s status line and
by ``Worker.health``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    """Counters since start (read by ``jsworker serve``'s status line)."""

    started: int = 0
    completed: int = 0
    failed: int = 0  # retriable failures (will be retried)
    dead: int = 0  # terminal failures (dead-lettered)
    continued: int = 0
    cancelled: int = 0
    nacked_on_stop: int = 0
    rate_limited: int = 0  # deferred (nak'ed) by a rate limit, attempt kept

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class WorkerHealth:
    """What went wrong in the background. ``fatal`` set means the worker has failed
    (``Worker.run()`` raises, ``jsworker serve`` exits non-zero)."""

    consumer_deleted: int = 0
    loop_failures: int = 0
    last_error: str = ""
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None
