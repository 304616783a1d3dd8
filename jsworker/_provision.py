"""Provisioning of the streams and KV buckets of the wire contract (docs/wire.md).

Every function is idempotent. An existing stream or bucket whose configuration differs
from the one jsworker wants is *reported* as drifted; fields the server allows to change
in place (max age, duplicate window, replicas, added subjects, history) are updated when
``update=True``, others (retention, storage) are left alone and reported, because
changing them means deleting data.

Modes: ``apply`` (default) creates and updates; ``check`` and ``dry_run`` change nothing
and report what is missing or drifted (``check`` is what ``jsworker kv setup --check``
uses to fail a CI pipeline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from . import _names as n
from ._errors import ConfigError, NotProvisionedError, ServerError

Status = Literal[
    "created", "exists", "updated", "drifted", "missing", "would-create", "would-update"
]
Mode = Literal["apply", "check", "dry_run"]

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class StreamSpec:
    """What jsworker wants of one stream (durations in seconds, 0 = unlimited)."""

    name: str
    subjects: tuple[str, ...]
    retention: RetentionPolicy
    storage: StorageType = StorageType.FILE
    max_age: float = 0.0
    duplicate_window: float = 0.0
    max_msgs_per_subject: int = -1
    kv_bucket: str | None = None  # set for the stream behind a KV bucket


@dataclass
class ProvisionResult:
    kind: Literal["stream", "kv"]
    name: str
    status: Status
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "details": self.details,
        }


def stream_specs() -> list[StreamSpec]:
    return [
        StreamSpec(
            n.TASK_STREAM, ("task.>",), RetentionPolicy.WORK_QUEUE, duplicate_window=10 * MINUTE
        ),
        StreamSpec(
            n.STICKY_STREAM,
            ("sticky.>",),
            RetentionPolicy.WORK_QUEUE,
            storage=StorageType.MEMORY,
            max_age=30 * MINUTE,
            duplicate_window=2 * MINUTE,
        ),
        StreamSpec(
            n.HISTORY_STREAM,
            ("history.>",),
            RetentionPolicy.LIMITS,
            max_age=7 * DAY,
            duplicate_window=10 * MINUTE,
        ),
        StreamSpec(
            n.DEAD_LETTER_STREAM,
            ("dead.>",),
            RetentionPolicy.LIMITS,
            max_age=30 * DAY,
            duplicate_window=2 * MINUTE,
        ),
    ]


# bucket -> (ttl seconds or 0, history)
_KV: dict[str, tuple[float, int]] = {
    n.WORKERS_BUCKET: (60.0, 1),
    n.RATE_LIMITS_BUCKET: (0.0, 1),
    n.STICKY_BINDINGS_BUCKET: (30 * MINUTE, 1),
    n.PARTITION_GROUPS_BUCKET: (0.0, 1),
    n.CHECKPOINTS_BUCKET: (0.0, 1),
    n.SIGNALS_BUCKET: (7 * DAY, 1),
}
REQUIRED_BUCKETS: tuple[str, ...] = (
    n.WORKERS_BUCKET,
    n.RATE_LIMITS_BUCKET,
    n.STICKY_BINDINGS_BUCKET,
    n.PARTITION_GROUPS_BUCKET,
)
OPTIONAL_BUCKETS: tuple[str, ...] = (n.CHECKPOINTS_BUCKET, n.SIGNALS_BUCKET)


def kv_spec(bucket: str) -> StreamSpec:
    ttl, history = _KV[bucket]
    return StreamSpec(
        f"KV_{bucket}",
        (f"$KV.{bucket}.>",),
        RetentionPolicy.LIMITS,
        max_age=ttl,
        duplicate_window=min(ttl, 2 * MINUTE) if ttl else 2 * MINUTE,
        max_msgs_per_subject=history,
        kv_bucket=bucket,
    )


def _close(a: float | None, b: float) -> bool:
    return abs((a or 0.0) - b) < 0.001


def _diff(spec: StreamSpec, cfg: StreamConfig, replicas: int) -> tuple[list[str], list[str]]:
    """Return (safe differences, unsafe differences) between the wanted and actual config."""
    safe: list[str] = []
    unsafe: list[str] = []
    have = set(cfg.subjects or ())
    missing = [s for s in spec.subjects if s not in have]
    if missing:
        safe.append(f"subjects: missing {', '.join(missing)}")
    if cfg.retention != spec.retention:
        unsafe.append(f"retention: {_v(cfg.retention)} (want {_v(spec.retention)})")
    if cfg.storage != spec.storage:
        unsafe.append(f"storage: {_v(cfg.storage)} (want {_v(spec.storage)})")
    if not _close(cfg.max_age, spec.max_age):
        safe.append(f"max_age: {cfg.max_age or 0:g}s (want {spec.max_age:g}s)")
    if spec.kv_bucket is None and not _close(cfg.duplicate_window, spec.duplicate_window):
        safe.append(
            f"duplicate_window: {cfg.duplicate_window or 0:g}s (want {spec.duplicate_window:g}s)"
        )
    if spec.kv_bucket is not None and cfg.max_msgs_per_subject != spec.max_msgs_per_subject:
        safe.append(f"history: {cfg.max_msgs_per_subject} (want {spec.max_msgs_per_subject})")
    if (cfg.num_replicas or 1) != replicas:
        safe.append(f"replicas: {cfg.num_replicas or 1} (want {replicas})")
    return safe, unsafe


def _covers(wide: str, narrow: str) -> bool:
    """True when subject pattern ``wide`` matches everything ``narrow`` matches."""
    w, n_ = wide.split("."), narrow.split(".")
    for i, tok in enumerate(w):
        if tok == ">":
            return len(n_) > i
        if i >= len(n_) or (tok != "*" and tok != n_[i]) or (tok == "*" and n_[i] == ">"):
            return False
    return len(w) == len(n_)


def _v(x: object) -> str:
    return str(getattr(x, "value", x))


async def _ensure(
    js: JetStreamContext,
    kind: Literal["stream", "kv"],
    spec: StreamSpec,
    *,
    replicas: int,
    mode: Mode,
    update: bool,
) -> ProvisionResult:
    name = spec.kv_bucket or spec.name
    try:
        info = await js.stream_info(spec.name)
    except nats.js.errors.NotFoundError:
        if mode == "check":
            return ProvisionResult(kind, name, "missing")
        if mode == "dry_run":
            return ProvisionResult(kind, name, "would-create")
        await _create(js, spec, replicas)
        return ProvisionResult(kind, name, "created")
    safe, unsafe = _diff(spec, info.config, replicas)
    if not safe and not unsafe:
        return ProvisionResult(kind, name, "exists")
    details = safe + [f"{d} - cannot be changed in place; recreate to fix" for d in unsafe]
    if mode != "apply" or not update or not safe:
        status: Status = "would-update" if (mode == "dry_run" and safe and update) else "drifted"
        return ProvisionResult(kind, name, status, details)
    cfg = info.config
    # keep subjects the wanted ones do not cover; the server refuses overlapping ones
    kept = {x for x in cfg.subjects or () if not any(_covers(w, x) for w in spec.subjects)}
    cfg.subjects = sorted(kept | set(spec.subjects))
    cfg.max_age = spec.max_age
    if spec.kv_bucket is None:
        cfg.duplicate_window = spec.duplicate_window
    else:
        cfg.max_msgs_per_subject = spec.max_msgs_per_subject
    cfg.num_replicas = replicas
    try:
        await js.update_stream(cfg)
    except nats.js.errors.APIError as e:
        return ProvisionResult(
            kind, name, "drifted", [*details, f"update refused: {e.description}"]
        )
    return ProvisionResult(kind, name, "drifted" if unsafe else "updated", details)


#: a replicated stream cannot be placed yet (a node's JetStream has not reported to the
#: meta leader, as right after a cluster starts or a node restarts): worth retrying
_ERR_NO_PEERS = 10005
PLACEMENT_RETRY_FOR = 10.0


async def _create(js: JetStreamContext, spec: StreamSpec, replicas: int) -> None:
    """Create one stream or bucket. "No suitable peers for placement" is retried for up
    to ``PLACEMENT_RETRY_FOR`` seconds when replicated: a cluster that has just started
    (or lost a node that is coming back) reports its peers within moments."""
    deadline = time.monotonic() + PLACEMENT_RETRY_FOR
    while True:
        try:
            await _create_once(js, spec, replicas)
            return
        except nats.js.errors.APIError as e:
            if replicas == 1 or e.err_code != _ERR_NO_PEERS or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def _create_once(js: JetStreamContext, spec: StreamSpec, replicas: int) -> None:
    if spec.kv_bucket is not None:
        await js.create_key_value(
            bucket=spec.kv_bucket,
            ttl=spec.max_age or None,
            history=spec.max_msgs_per_subject,
            replicas=replicas,
            storage=spec.storage,
        )
        return
    await js.add_stream(
        StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=spec.retention,
            storage=spec.storage,
            max_age=spec.max_age or None,
            duplicate_window=spec.duplicate_window,
            num_replicas=replicas,
            discard=DiscardPolicy.OLD,
        )
    )


def _check_replicas(replicas: int) -> None:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 5:
        raise ConfigError(f"replicas must be an integer from 1 to 5, got {replicas!r}")


async def setup_streams(
    nc: NATS, *, replicas: int = 1, mode: Mode = "apply", update: bool = True
) -> list[ProvisionResult]:
    """Create (or check) the four streams: TASK_QUEUES, STICKY_TASKS, WORKFLOW_HISTORY,
    DEAD_LETTERS. Returns one result per stream."""
    _check_replicas(replicas)
    js = nc.jetstream()
    return [
        await _guard(_ensure(js, "stream", s, replicas=replicas, mode=mode, update=update))
        for s in stream_specs()
    ]


async def setup_kv_buckets(
    nc: NATS,
    *,
    replicas: int = 1,
    optional: Iterable[str] = OPTIONAL_BUCKETS,
    mode: Mode = "apply",
    update: bool = True,
) -> list[ProvisionResult]:
    """Create (or check) the KV buckets: ``workers``, ``rate_limits``, ``sticky_bindings``,
    ``elastic-consumer-groups`` and the optional ones named in ``optional`` (default
    ``checkpoints`` and ``signals``; pass ``()`` to skip them)."""
    _check_replicas(replicas)
    opt = tuple(optional)
    unknown = [b for b in opt if b not in OPTIONAL_BUCKETS]
    if unknown:
        raise ConfigError(f"unknown optional bucket(s) {unknown}; known: {list(OPTIONAL_BUCKETS)}")
    js = nc.jetstream()
    return [
        await _guard(_ensure(js, "kv", kv_spec(b), replicas=replicas, mode=mode, update=update))
        for b in (*REQUIRED_BUCKETS, *opt)
    ]


async def setup_all(
    nc: NATS,
    *,
    replicas: int = 1,
    optional: Iterable[str] = OPTIONAL_BUCKETS,
    mode: Mode = "apply",
    update: bool = True,
) -> list[ProvisionResult]:
    """``setup_streams`` then ``setup_kv_buckets``; see both."""
    return [
        *await setup_streams(nc, replicas=replicas, mode=mode, update=update),
        *await setup_kv_buckets(nc, replicas=replicas, optional=optional, mode=mode, update=update),
    ]


async def _guard(coro: object) -> ProvisionResult:
    try:
        return await coro  # type: ignore[misc,no-any-return]
    except nats.js.errors.ServiceUnavailableError:
        raise ServerError("JetStream is not enabled on this server (start it with -js)") from None
    except nats.errors.NoRespondersError:
        raise ServerError("JetStream is not enabled on this server (no responders)") from None
    except nats.errors.TimeoutError:
        raise ServerError("JetStream API did not answer in time") from None


async def require_stream(
    js: JetStreamContext,
    name: str,
    hint: str = "run `jsworker kv setup` (or jsworker.setup_all(nc))",
) -> None:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(f"stream {name} does not exist: {hint}") from None
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise ServerError("JetStream is not enabled on this server") from None


def summarize(results: Sequence[ProvisionResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out
