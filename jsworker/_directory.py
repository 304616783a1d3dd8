"""The worker directory: one entry per live worker in KV ``workers`` (TTL 60 s),
refreshed every 30 s and deleted on stop. A worker that dies simply stops refreshing
and its entry expires.

Presence, separately from the entry: a worker that is a member of an elastic group
answers requests on ``jsworker.workers.{worker_id}.ping`` from before it joins until it
stops (``ensure_presence``; only then, so a worker without partitioned handlers needs no
permission for that subject). Asking costs no KV write,
and the answer needs no clock: a reply means alive, the server's "no responders" means
the worker's connection is gone (its process died or it is reconnecting), a timeout
means it is stalled or cut off (then only the entry's age can tell). Partition members
use it to find a dead member within seconds instead of one TTL (``_partitions``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from . import _names as n
from ._aio import cancel_and_wait
from ._errors import NotProvisionedError, ServerError
from ._services import kv_snapshot
from ._version import __version__
from ._wire import dumps, now_rfc3339

log = logging.getLogger("jsworker.directory")

REFRESH_EVERY = 30.0


def ping_subject(worker_id: str) -> str:
    return f"jsworker.workers.{worker_id}.ping"


_presence: dict[tuple[int, str], Subscription] = {}


async def ensure_presence(nc: NATS, worker_id: str) -> None:
    """Answer on the worker's presence subject from now on (once per connection and
    worker; ``drop_presence`` ends it). Raises ``ServerError`` when the server refused the
    subscription (a member nobody hears could be judged dead while it works)."""
    key = (id(nc), worker_id)
    if key in _presence:
        return

    async def pong(msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(worker_id.encode())

    _presence[key] = await nc.subscribe(ping_subject(worker_id), cb=pong)
    await nc.flush(timeout=5)
    if nc.options.get("no_echo"):
        return  # our own request could not reach our own subscription
    state = await probe(nc, worker_id, timeout=2.0)
    if state == "gone":
        await drop_presence(nc, worker_id)
        raise ServerError(
            f"the server refused a subscription to {ping_subject(worker_id)}; partition "
            "members must subscribe and publish on jsworker.workers.*.ping (docs/security.md)"
        )
    if state == "silent":
        log.warning(
            "no answer on our own presence subject %s: may this user publish there?",
            ping_subject(worker_id),
        )


async def drop_presence(nc: NATS, worker_id: str) -> None:
    sub = _presence.pop((id(nc), worker_id), None)
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def probe(nc: NATS, worker_id: str, timeout: float = 1.0) -> str:
    """``"alive"`` (it answered), ``"gone"`` (no responders: its connection is closed)
    or ``"silent"`` (no answer in ``timeout``: stalled, or cut off from the server)."""
    try:
        await nc.request(ping_subject(worker_id), b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        return "gone"
    except nats.errors.TimeoutError:
        return "silent"
    return "alive"


class Directory:
    def __init__(
        self,
        nc: NATS,
        worker_id: str,
        describe: Callable[[], dict[str, Any]],
        spawn: Callable[[str, Callable[[], Awaitable[None]]], asyncio.Task[None]],
        refresh_every: float = REFRESH_EVERY,
    ) -> None:
        self.nc = nc
        self.spawn = spawn
        self.worker_id = worker_id
        self.describe = describe
        self.refresh_every = refresh_every
        self.kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    def entry(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "worker_id": self.worker_id,
            "language": "python",
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "version": __version__,
            "last_seen": now_rfc3339(),
        }
        base.update(self.describe())
        return base

    async def start(self) -> None:
        try:
            self.kv = await self.nc.jetstream().key_value(n.WORKERS_BUCKET)
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(
                f"KV bucket {n.WORKERS_BUCKET!r} (the worker directory) does not exist: "
                "run `jsworker kv setup` (or jsworker.setup_all(nc))"
            ) from None
        await self.refresh()
        self._task = self.spawn("directory", self._loop)

    async def refresh(self) -> None:
        assert self.kv is not None
        await self.kv.put(self.worker_id, dumps(self.entry()))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            try:
                await self.refresh()
            except Exception as e:  # keep refreshing through reconnects
                log.warning("directory refresh failed: %s", e)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await drop_presence(self.nc, self.worker_id)  # if a partition member started it
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.delete(self.worker_id)


async def list_workers(nc: NATS) -> list[dict[str, Any]]:
    """Entries of every live worker (any language), sorted by worker id."""
    try:
        kv = await nc.jetstream().key_value(n.WORKERS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.WORKERS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None
    out = []
    for raw in (await kv_snapshot(kv)).values():
        with contextlib.suppress(ValueError):
            out.append(json.loads(raw))
    return out


#: an entry whose ``last_seen`` is older than this is not live (the bucket's TTL, 60 s,
#: removes it anyway; this also covers a bucket made without a TTL), with 30 s of slack
#: for clock differences between the worker and the reader
LIVE_AGE = 90.0


def is_live(entry: Any, now: float | None = None, max_age: float = LIVE_AGE) -> bool:
    """A directory entry counts as a live worker: a JSON object whose ``last_seen``
    (RFC 3339) is at most ``max_age`` seconds old (an entry without one: live, since
    the bucket's TTL expires it)."""
    import time
    from datetime import UTC, datetime

    if not isinstance(entry, dict):
        return False
    stamp = entry.get("last_seen")
    if not isinstance(stamp, str):
        return True
    try:
        seen = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return True
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    return (now if now is not None else time.time()) - seen.timestamp() <= max_age


def serves(entry: Any, task_type: str, group: str | None) -> bool:
    """Whether a directory entry's worker has a handler for ``task_type`` on ``group``:
    the type is in its ``task_types``, and it was started with that group (``group``
    given) or without groups (``group`` None: such a worker takes every task of the
    type)."""
    if not isinstance(entry, dict):
        return False
    types = entry.get("task_types")
    if not isinstance(types, list) or task_type not in types:
        return False
    groups = entry.get("groups")
    groups = [g for g in groups if g] if isinstance(groups, list) else []
    return group in groups if group else not groups
