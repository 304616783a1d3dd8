"""One supervisor for every background loop of a worker.

Pull loops, lease heartbeats, the directory refresh, the cancel watch and the partition
watch/reconcile/sweep loops all run through :meth:`Supervisor.spawn`. A loop that raises
is logged with its traceback, counted in the worker's health, and started again after a
backoff (0.1 s doubling to 5 s; reset once it has run for 30 s). A failure that a restart
cannot mend fails the whole worker: the NATS connection closed for good, or an error the
loop marks as fatal (:class:`FatalLoopError`). ``Worker.run()`` raises it, so
``jsworker serve`` exits non-zero and a process supervisor (systemd, Kubernetes) restarts
the process, instead of a worker that serves nothing while looking healthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from ._aio import cancel_and_wait
from ._errors import JSWorkerError
from ._stats import WorkerHealth

log = logging.getLogger("jsworker.supervisor")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 30.0  # a loop that ran this long before failing starts its backoff afresh
CONNECTION_CHECK = 0.5


class FatalLoopError(JSWorkerError):
    """Raised by a background loop when restarting it cannot help."""


class Supervisor:
    """Starts, restarts and finally cancels a worker's background loops."""

    def __init__(self, nc: NATS, health: WorkerHealth) -> None:
        self.nc = nc
        self.health = health
        self.error: BaseException | None = None
        self._failed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def spawn(
        self, name: str, loop: Callable[[], Awaitable[None]], *, restart: bool = True
    ) -> asyncio.Task[None]:
        """Run ``loop()`` in the background under supervision and return its task.

        When ``loop()`` returns, the task ends. When it raises, it is called again after
        a backoff (``restart=False``: the failure is fatal instead). Cancelling the
        returned task stops it for good."""
        task = asyncio.create_task(self._guard(name, loop, restart), name=f"jsworker:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def watch_connection(self) -> asyncio.Task[None]:
        """Fail the worker when nats-py closes its connection for good (a closed client
        never reconnects: e.g. the server dropped it for a protocol violation after
        the reconnect attempts ran out, or someone called ``nc.close()``)."""
        return self.spawn("connection", self._watch_connection, restart=False)

    async def _watch_connection(self) -> None:
        # Polled: the closed callback belongs to whoever connected the client, and
        # nats-py offers no other notification.
        while not self.nc.is_closed:  # noqa: ASYNC110
            await asyncio.sleep(CONNECTION_CHECK)
        raise FatalLoopError("the NATS connection was closed for good")

    def fail(self, error: BaseException) -> None:
        """Fail the worker (the first error wins)."""
        if self._failed.is_set():
            return
        self.error = error
        self.health.fatal = f"{type(error).__name__}: {error}"
        self._failed.set()

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self.error is not None
        return self.error

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]], restart: bool) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.health.loop_failures += 1
                self.health.last_error = f"{name}: {type(e).__name__}: {e}"
                if not restart or isinstance(e, FatalLoopError) or self.nc.is_closed:
                    # a FatalLoopError explains itself, and so does any error once the
                    # connection is closed; anything else needs its traceback
                    tb = None if isinstance(e, FatalLoopError) or self.nc.is_closed else e
                    log.error("%s: %s; the worker cannot go on", name, e, exc_info=tb)
                    self.fail(e)
                    return
                if time.monotonic() - started >= HEALTHY_AFTER:
                    failures = 0
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**failures)
                failures += 1
                log.error(
                    "background loop %s failed (failure %d); restarting in %.1fs",
                    name,
                    failures,
                    delay,
                    exc_info=e,
                )
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Cancel every loop still running and wait until they are gone."""
        while self._tasks:
            await asyncio.gather(*(cancel_and_wait(t) for t in list(self._tasks)))
