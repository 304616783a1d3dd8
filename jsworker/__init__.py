"""jsworker: task handlers on NATS JetStream.

The public API is what this module exports; everything in ``_modules`` is private.
"""

from ._client import Client, NoWorkerWarning, StreamItem, TaskHandle, TaskRequest
from ._context import Outcome, TaskCancelledError, TaskContext, TaskInfo
from ._dead import (
    DeadLetter,
    DeadLetterNotFound,
    ReplayError,
    ReplayResult,
    get_dead,
    list_dead,
    purge_dead,
    replay_dead,
)
from ._directory import list_workers
from ._errors import (
    ConfigError,
    ConsumerConflictError,
    EmbeddedServerError,
    InvalidNameError,
    JSWorkerError,
    LifecycleError,
    NotProvisionedError,
    OutcomeAlreadySetError,
    PayloadError,
    PermanentError,
    RetryableError,
    ServerError,
    TaskError,
    TaskFailed,
    TaskTimeout,
    WorkerFailedError,
)
from ._provision import ProvisionResult, setup_all, setup_kv_buckets, setup_streams
from ._ratelimit import RateLimit, RateLimitKeyError, list_rate_limits, reset_rate_limits
from ._retry import RetryPolicy
from ._server import EmbeddedCluster, EmbeddedServer, find_nats_server
from ._services import CorruptValueError, SignalTimeoutError
from ._stats import WorkerStats
from ._telemetry import Telemetry
from ._version import __version__
from ._worker import Worker


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext jsworker``: the ``%jsworker`` magics (imports IPython-facing code only
    now, never at ``import jsworker``)."""
    from .interactive._magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from .interactive._magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "Client",
    "ConfigError",
    "ConsumerConflictError",
    "CorruptValueError",
    "DeadLetter",
    "DeadLetterNotFound",
    "EmbeddedCluster",
    "EmbeddedServer",
    "EmbeddedServerError",
    "InvalidNameError",
    "JSWorkerError",
    "LifecycleError",
    "NoWorkerWarning",
    "NotProvisionedError",
    "Outcome",
    "OutcomeAlreadySetError",
    "PayloadError",
    "PermanentError",
    "ProvisionResult",
    "RateLimit",
    "RateLimitKeyError",
    "ReplayError",
    "ReplayResult",
    "RetryPolicy",
    "RetryableError",
    "ServerError",
    "SignalTimeoutError",
    "StreamItem",
    "TaskCancelledError",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskRequest",
    "TaskTimeout",
    "Telemetry",
    "Worker",
    "WorkerFailedError",
    "WorkerStats",
    "__version__",
    "find_nats_server",
    "get_dead",
    "list_dead",
    "list_rate_limits",
    "list_workers",
    "load_ipython_extension",
    "purge_dead",
    "replay_dead",
    "reset_rate_limits",
    "setup_all",
    "setup_kv_buckets",
    "setup_streams",
]
