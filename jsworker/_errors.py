"""The exception tree. Everything jsworker raises derives from :class:`JSWorkerError`.

Programmer errors (bad names, out-of-range options, registering after start) derive
from :class:`ConfigError` and are raised at construction, registration or ``start()``,
never on the first message.
"""

from __future__ import annotations

from typing import Any


class JSWorkerError(Exception):
    """Base of every exception jsworker raises."""


class ConfigError(JSWorkerError, ValueError):
    """A programmer error: an invalid name, option or call order."""


class InvalidNameError(ConfigError):
    """A task type, group, run id or other subject token is not allowed."""


class LifecycleError(JSWorkerError, RuntimeError):
    """A call made in the wrong state (handler after start, start twice, ...)."""


class WorkerFailedError(JSWorkerError):
    """The worker cannot go on (a background loop failed for good, or its NATS
    connection was closed). Raised by ``Worker.run()``; ``__cause__`` is the failure."""


class ServerError(JSWorkerError):
    """The NATS server refused or could not be reached."""


class EmbeddedServerError(ServerError):
    """The embedded ``nats-server`` could not be started."""


class NotProvisionedError(ServerError):
    """A stream or KV bucket jsworker needs does not exist.

    The message names the command that creates it (``jsworker kv setup``).
    """


class ConsumerConflictError(ServerError):
    """A consumer exists with a configuration that cannot be shared."""


class TaskError(JSWorkerError):
    """Errors about a single task."""


class OutcomeAlreadySetError(TaskError, RuntimeError):
    """A second outcome (complete/fail/...) was requested; the first one stands."""


class PayloadError(TaskError, ValueError):
    """A payload is not valid JSON or is too large."""


class TaskFailed(TaskError):
    """Raised by ``TaskHandle.result()`` when the task failed for good.

    Attributes: ``error`` (the message the handler gave), ``kind`` (``non_retriable``,
    ``exhausted``, ``invalid_payload`` ...), ``event`` (the raw event dict).
    """

    def __init__(self, error: str, kind: str, event: dict[str, Any] | None = None) -> None:
        super().__init__(f"task failed ({kind}): {error}")
        self.error = error
        self.kind = kind
        self.event = event or {}


class TaskTimeout(TaskError, TimeoutError):
    """No result arrived within the given timeout. The task may still finish."""


class RetryableError(TaskError):
    """Raise from a handler to fail with a retry after a given delay."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(TaskError):
    """Raise from a handler to fail permanently (no retry, dead letter)."""
