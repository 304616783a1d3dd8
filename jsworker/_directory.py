"""The worker directory: one entry per live worker in KV ``workers`` (TTL 60 s),
refreshed every 30 s and deleted on stop. A worker that dies simply stops refreshing
and its entry expires."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from . import _names as n
from ._aio import cancel_and_wait
from ._errors import NotProvisionedError
from ._services import kv_snapshot
from ._version import __version__
from ._wire import dumps, now_rfc3339

log = logging.getLogger("jsworker.directory")

REFRESH_EVERY = 30.0


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
