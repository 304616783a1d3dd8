"""Provisioning of the streams and KV buckets of the wire contract (docs/wire.md).

Every function is idempotent. An existing stream or bucket whose configuration differs
from the one jsworker wants is *reported* as drifted; fields the server allows to change
in place (max age, duplicate window, replicas, added subjects, history) are updated when
``update=True``, others (retention, storage) are left alone and reported, because
changing them means deleting data.

Modes: ``apply`` (default) creates and updates; ``check`` and ``dry_run`` change nothing
and report what is missing or drifted (``check`` is what ``jsworker kv setup --check``
uses to fail a CI pipeline).

Provisioning never fights another owner (docs/dagnats.md): on a server DagNats
provisioned (its ``SLEEP_TIMERS`` stream or ``workflow_runs`` bucket exists) an existing
stream or bucket is never changed; where it differs from jsworker's own defaults only in
settings jsworker can live with (max age, duplicate window, TTL, replicas) it is
``compatible``; only missing ones are created. Replicas follow the cluster: by default
an existing stream's count, for new ones 3 on a cluster of 3 or more servers; a stream is
never scaled down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from . import _names as n
from ._errors import ConfigError, NotProvisionedError, ServerError

Status = Literal[
    "created",
    "exists",
    "compatible",
    "updated",
    "drifted",
    "missing",
    "would-create",
    "would-update",
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
            # limits retention, as DagNats creates it (its engine refuses to start on a
            # work-queue STICKY_TASKS); workers delete a sticky task once it is settled
            n.STICKY_STREAM,
            ("sticky.>",),
            RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY,
            max_age=30 * MINUTE,
            duplicate_window=2 * MINUTE,
        ),
        StreamSpec(
            n.HISTORY_STREAM,
            ("history.>",),
            RetentionPolicy.LIMITS,
            max_age=30 * DAY,  # DagNats's retention too
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
    if (cfg.num_replicas or 1) < replicas:
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
    update: bool | Literal["foreign"],
) -> ProvisionResult:
    name = spec.kv_bucket or spec.name
    foreign = update == "foreign"
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
    scaled = (info.config.num_replicas or 1) > replicas
    note = [f"replicas {info.config.num_replicas} kept (never scaled down)"] if scaled else []
    if not safe and not unsafe:
        return ProvisionResult(kind, name, "exists", note)
    if foreign and not unsafe:
        # DagNats's stream or bucket, in settings jsworker works with: left as it is
        return ProvisionResult(
            kind, name, "compatible", [f"{d} - DagNats's setting, kept" for d in safe] + note
        )
    details = safe + [f"{d} - cannot be changed in place; recreate to fix" for d in unsafe]
    if mode != "apply" or not update or foreign or not safe:
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
    cfg.num_replicas = max(replicas, cfg.num_replicas or 1)
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
        # the bucket's stream as nats.go creates it (nats-py's create_key_value turns on
        # per-message TTLs, which cannot be turned off again: DagNats's engine, updating
        # its buckets with nats.go at every start, would then refuse to start)
        ttl = spec.max_age or None
        await js.add_stream(
            StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=RetentionPolicy.LIMITS,
                storage=spec.storage,
                max_age=ttl,
                max_msgs_per_subject=spec.max_msgs_per_subject,
                max_msgs=-1,
                max_bytes=-1,
                max_consumers=-1,
                duplicate_window=min(ttl, 2 * MINUTE) if ttl else 2 * MINUTE,
                num_replicas=replicas,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
            )
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


async def dagnats_provisioned(js: JetStreamContext) -> bool:
    """True when DagNats provisioned this server (its ``SLEEP_TIMERS`` stream or its
    ``workflow_runs`` bucket exists)."""
    for stream in ("SLEEP_TIMERS", "KV_workflow_runs"):
        try:
            await js.stream_info(stream)
            return True
        except nats.js.errors.NotFoundError:
            continue
    return False


async def cluster_replicas(nc: NATS, js: JetStreamContext) -> int:
    """Replicas that follow the cluster: those of an existing ``TASK_QUEUES``, else 3 on
    a cluster of 3 or more servers (as the server announces them), else 1."""
    try:
        return int((await js.stream_info(n.TASK_STREAM)).config.num_replicas or 1)
    except nats.js.errors.NotFoundError:
        pass
    info = getattr(nc, "_server_info", None) or {}
    size = len(info.get("connect_urls") or ()) if info.get("cluster") else 1
    return 3 if size >= 3 else 1


async def _plan(
    nc: NATS, replicas: int | None, update: bool
) -> tuple[int, bool | Literal["foreign"]]:
    js = nc.jetstream()
    if replicas is None:
        replicas = await _guard(cluster_replicas(nc, js))
    _check_replicas(replicas)
    foreign = update and await _guard(dagnats_provisioned(js))
    return replicas, "foreign" if foreign else update


async def setup_streams(
    nc: NATS, *, replicas: int | None = None, mode: Mode = "apply", update: bool = True
) -> list[ProvisionResult]:
    """Create (or check) the four streams: TASK_QUEUES, STICKY_TASKS, WORKFLOW_HISTORY,
    DEAD_LETTERS. Returns one result per stream. ``replicas=None`` follows the cluster
    (see the module docstring)."""
    reps, upd = await _plan(nc, replicas, update)
    js = nc.jetstream()
    return [
        await _guard(_ensure(js, "stream", s, replicas=reps, mode=mode, update=upd))
        for s in stream_specs()
    ]


async def setup_kv_buckets(
    nc: NATS,
    *,
    replicas: int | None = None,
    optional: Iterable[str] = OPTIONAL_BUCKETS,
    mode: Mode = "apply",
    update: bool = True,
) -> list[ProvisionResult]:
    """Create (or check) the KV buckets: ``workers``, ``rate_limits``, ``sticky_bindings``,
    ``elastic-consumer-groups`` and the optional ones named in ``optional`` (default
    ``checkpoints`` and ``signals``; pass ``()`` to skip them)."""
    if replicas is not None:
        _check_replicas(replicas)
    reps, upd = await _plan(nc, replicas, update)
    opt = tuple(optional)
    unknown = [b for b in opt if b not in OPTIONAL_BUCKETS]
    if unknown:
        raise ConfigError(f"unknown optional bucket(s) {unknown}; known: {list(OPTIONAL_BUCKETS)}")
    js = nc.jetstream()
    return [
        await _guard(_ensure(js, "kv", kv_spec(b), replicas=reps, mode=mode, update=upd))
        for b in (*REQUIRED_BUCKETS, *opt)
    ]


async def setup_all(
    nc: NATS,
    *,
    replicas: int | None = None,
    optional: Iterable[str] = OPTIONAL_BUCKETS,
    mode: Mode = "apply",
    update: bool = True,
) -> list[ProvisionResult]:
    """``setup_streams`` then ``setup_kv_buckets``; see both."""
    return [
        *await setup_streams(nc, replicas=replicas, mode=mode, update=update),
        *await setup_kv_buckets(nc, replicas=replicas, optional=optional, mode=mode, update=update),
    ]


async def _guard(coro: Any) -> Any:
    try:
        return await coro
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
