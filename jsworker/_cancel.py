"""Cancellation: a run is cancelled by a record in KV ``signals`` under
``{run_id}._cancel``. Every worker watches those keys, so

* a queued task of a cancelled run is never started: it is recorded as
  ``step.cancelled`` and terminated when a worker picks it up;
* a running task is asked to stop: ``ctx.cancelled`` becomes True and an async
  handler gets ``CancelledError`` at its next await (a plain ``def`` handler cannot be
  interrupted; it should poll ``ctx.cancelled``).

Without the ``signals`` bucket cancellation is unavailable (``Client.cancel`` raises
``NotProvisionedError``) and the worker runs everything it pulls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from nats.js.kv import KeyValue

from ._aio import cancel_and_wait
from ._errors import ServerError
from ._services import CANCEL_SIGNAL, KV_DEL_OPS

log = logging.getLogger("jsworker.cancel")
MAX_REMEMBERED = 100_000


class CancelWatcher:
    def __init__(
        self,
        kv: KeyValue | None,
        on_cancel: Callable[[str, str], None],
        spawn: Callable[[str, Callable[[], Awaitable[None]]], asyncio.Task[None]],
    ) -> None:
        self.kv = kv
        self.on_cancel = on_cancel
        self.spawn = spawn
        self.cancelled: OrderedDict[str, str] = OrderedDict()
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def available(self) -> bool:
        return self.kv is not None

    def reason(self, run_id: str) -> str | None:
        return self.cancelled.get(run_id)

    async def start(self) -> None:
        if self.kv is None:
            return
        self._task = self.spawn("cancel-watch", self._loop)
        # wait for the existing records so queued tasks of cancelled runs are caught
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 5.0)

    async def _loop(self) -> None:
        """Follow the cancel records. Supervised: a watch that ends or fails is started
        again (it first delivers every current record, so nothing is missed)."""
        assert self.kv is not None
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        self._watcher = await self.kv.watch(f"*.{CANCEL_SIGNAL}")
        async for entry in self._watcher:
            if entry is None:
                self._ready.set()
                continue
            run_id = entry.key[: -len(CANCEL_SIGNAL) - 1]
            if entry.operation in KV_DEL_OPS:
                self.cancelled.pop(run_id, None)
                continue
            reason = "cancelled"
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                reason = str(json.loads(entry.value or b"{}").get("reason") or reason)
            self.cancelled[run_id] = reason
            self.cancelled.move_to_end(run_id)
            while len(self.cancelled) > MAX_REMEMBERED:
                self.cancelled.popitem(last=False)
            if entry.delta == 0:
                self._ready.set()
            try:
                self.on_cancel(run_id, reason)
            except Exception:  # pragma: no cover - defensive
                log.exception("cancel callback failed")
        raise ServerError("the cancel watch ended")  # the supervisor starts it again

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._watcher = None
