"""A pull loop written against the JetStream API (``$JS.API.CONSUMER.MSG.NEXT``).

nats-py's ``fetch`` holds one request at a time and cannot pass priority-group fields,
so every handler runs its own :class:`PullLoop` instead. Each loop owns one wildcard
inbox subscription ``{inbox}.*``; every pull request gets its own reply subject
``{inbox}.{n}``, so a message or a status (404/408/409) says exactly which request it
belongs to and the slots reserved for that request are returned precisely. Several
requests may be outstanding, so capacity freed by finished tasks is pulled again at
once instead of waiting for a request to expire.

Loops are independent of each other: stopping or replacing one handler's loop never
touches another's (the interactive mode relies on this).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._aio import cancel_and_wait

log = logging.getLogger("jsworker.pull")

STATUS = "Status"
DESCRIPTION = "Description"
PENDING_MSGS = "Nats-Pending-Messages"
#: seconds between pull requests while the consumer has no leader (status 503)
NO_RESPONDERS_PAUSE = 0.5
MAX_EXPIRED = 1024


class Slots:
    """A pool of execution credits: one credit per leased message, from delivery until
    its outcome is recorded. The worker has one pool of ``concurrency`` credits that
    every pull loop draws from, so a worker never leases more than it can run, however
    many handlers it has. A handler's own ``concurrency`` cap is a child pool: taking
    from it takes from the worker's pool too (``parent``)."""

    def __init__(self, size: int, parent: Slots | None = None) -> None:
        self.size = size
        self.free = size
        self.parent = parent
        self._root: Slots = parent._root if parent is not None else self
        self._changed = asyncio.Event()  # on the root only: every give reaches the root

    def available(self) -> int:
        own = self.free
        return own if self.parent is None else min(own, self.parent.available())

    async def take(self, most: int, least: int = 1) -> int:
        """Wait until at least ``least`` credits are free here and in every parent pool,
        then reserve up to ``most``."""
        least = max(1, min(least, most, self.size))
        changed = self._root._changed
        while self.available() < least:
            changed.clear()
            await changed.wait()
        k = min(most, self.available())
        self.consume(k)
        return k

    def consume(self, k: int) -> None:
        self.free -= k
        if self.parent is not None:
            self.parent.consume(k)

    def give(self, k: int = 1) -> None:
        if k <= 0:
            return
        self.free += k
        if self.parent is not None:
            self.parent.give(k)
        else:
            self._changed.set()

    def resize(self, size: int) -> None:
        """Change the pool's size live (credits in use stay taken)."""
        self.free += size - self.size
        self.size = size
        self._root._changed.set()


@dataclass
class _Request:
    batch: int
    remaining: int
    deadline: float


class PullLoop:
    """Pull messages for one consumer and hand each to ``dispatch``.

    ``dispatch(msg)`` takes ownership of one credit, which it must give back when the
    message is done. ``extra()`` returns fields merged into each request (priority
    groups use it); ``on_status(code, desc, msg)`` sees every non-terminal status.
    ``spawn(name, loop)`` runs the request loop in the background (the worker's
    supervisor, which restarts it if it fails).

    Request size adapts so that an idle consumer does not park the worker's credits
    in a long poll: a loop starts asking for one message, then for as many as the
    consumer says it still has (each delivery carries that count) plus one, or, while
    tasks keep arriving, for about a quarter second's worth of them at the rate of the
    last second or two (so a steady stream is delivered as it arrives, not one pull
    round trip per task), up to ``batch``; and for one again when a request expires with
    nothing delivered. So a handler with nothing to do holds one credit of the worker's
    pool, and the rest serve the handlers that have work.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        slots: Slots,
        dispatch: Callable[[Msg], None],
        *,
        spawn: Callable[[str, Callable[[], Awaitable[None]]], asyncio.Task[None]],
        batch: int = 256,
        expires: float = 5.0,
        extra: Callable[[], dict[str, Any]] | None = None,
        on_status: Callable[[str, str, Msg], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.slots = slots
        self.dispatch = dispatch
        self.batch = batch
        self.expires = expires
        self.extra = extra
        self.on_status = on_status
        self.spawn = spawn
        self.want = 1  # current request size (see the class docstring)
        # messages received in the current one-second window and in the one before
        self._window = 0
        self._last_window = 0
        self._window_start = time.monotonic()
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._requests: dict[str, _Request] = {}
        self._seq = 0
        # slots reserved by requests and not yet filled by a message (exact: +batch per
        # request, -1 per message, -pending per request-ending status)
        self.outstanding = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._pause_until = 0.0
        #: requests given up at their deadline (a late status must not release twice)
        self._expired: set[str] = set()
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"

    @property
    def reserved(self) -> int:
        return sum(r.remaining for r in self._requests.values())

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        self._task = self.spawn(f"pull:{self.stream}/{self.consumer}", self._run)

    async def _on_msg(self, msg: Msg) -> None:
        hdr = msg.headers
        if hdr and STATUS in hdr and not msg.data:
            await self._on_status_msg(msg, hdr)
            return
        # JetStream delivers data messages with their original subject, so which request
        # a message answers is not known; attribute it to the oldest open request (the
        # server serves waiting requests in order). Slot accounting stays exact either
        # way because a request's end status says how many it did not deliver.
        for rid, req in self._requests.items():
            if req.remaining > 0:
                req.remaining -= 1
                if req.remaining == 0:
                    del self._requests[rid]
                break
        # Messages received in the current and the previous second: the arrival rate.
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._last_window = self._window if now - self._window_start < 2.0 else 0
            self._window = 0
            self._window_start = now
        self._window += 1
        try:
            # Ask for what the consumer has (plus one for what comes next), and while
            # tasks keep arriving for about a quarter second's worth of them, so each
            # new one is delivered at once instead of after a pull round trip. A
            # consumer that runs dry and quiet parks one credit, not a whole batch.
            recent = max(self._window, self._last_window) // 4
            self.want = min(self.batch, max(msg.metadata.num_pending + 1, recent))
        except Exception:  # no JetStream metadata: the executor reports it
            pass
        self._wake.set()
        if self.outstanding > 0:
            self.outstanding -= 1  # its reserved slot now belongs to the message
        else:
            self.slots.consume(1)  # unexpected extra message: account for it anyway
        if self._stopping:
            # arrived after stop: hand it back at once so no one waits for AckWait
            with contextlib.suppress(Exception):
                await msg.nak()
            self.slots.give(1)
            return
        self.dispatch(msg)

    async def _on_status_msg(self, msg: Msg, hdr: dict[str, str]) -> None:
        code = hdr[STATUS]
        if code == "100":  # idle heartbeat
            return
        rid = msg.subject[len(self._inbox) + 1 :]
        req = self._requests.pop(rid, None)
        if req is None and rid in self._expired:
            # we gave this request up at its deadline and released its credits then;
            # releasing its pending count again would free credits other requests hold
            self._expired.discard(rid)
            self._wake.set()
            return
        if code == "408" and req is not None and req.remaining == req.batch:
            self.want = 1  # expired with nothing delivered: idle, park one credit only
        # Every status but 100 ends its request: give back what it did not deliver. Not
        # only 404/408/409/423: a 503 (no responders: the consumer has no leader, as
        # during a cluster failover) ends it too, and a request dropped without giving
        # its credits back holds them for good; once it held all of them, the loop
        # never pulled again and the worker sat idle with tasks pending.
        pending = hdr.get(PENDING_MSGS)
        if pending is not None and pending.isdigit():
            undelivered = int(pending)
        else:
            undelivered = req.remaining if req is not None else 0
        self._release(undelivered)
        self._wake.set()
        if code == "503":
            # no consumer leader yet: pull again shortly, not in a tight loop
            self._pause_until = time.monotonic() + NO_RESPONDERS_PAUSE
        if code not in ("404", "408") and self.on_status is not None:
            await self.on_status(code, hdr.get(DESCRIPTION, ""), msg)

    async def _run(self) -> None:
        """Keep up to ``want`` credits' worth of pull requests open. Exceptions propagate
        to the supervisor, which restarts this loop (requests lost on the way expire by
        their deadline and give their credits back)."""
        while not self._stopping:
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._expire_lost()
            room = min(self.want, self.batch) - self.outstanding
            if room <= 0:
                # enough requested and not yet delivered: wait for deliveries or ends
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            # With requests already out, wait for a quarter of the room in free credits
            # so credits trickling back one by one do not become many 1-message
            # requests; at most about 4 requests are open at once, well under the
            # server's max_waiting.
            least = 1 if not self._requests else max(1, min(room, self.slots.size) // 4)
            k = await self._take(room, least)
            if k == 0:
                continue
            if self._stopping:
                self.slots.give(k)
                break
            self._seq += 1
            rid = str(self._seq)
            self._requests[rid] = _Request(k, k, time.monotonic() + self.expires + 2.0)
            self.outstanding += k
            req: dict[str, Any] = {"batch": k, "expires": int(self.expires * 1e9)}
            if self.extra is not None:
                req.update(self.extra())
            await self.nc.publish(self._api, json.dumps(req).encode(), reply=f"{self._inbox}.{rid}")

    async def _take(self, want: int, least: int) -> int:
        """Reserve slots, waking periodically to expire requests lost to a reconnect."""
        take = asyncio.ensure_future(self.slots.take(want, least))
        while True:
            try:
                done, _ = await asyncio.wait({take}, timeout=1.0)
            except asyncio.CancelledError:
                # do not leave the reservation running behind our back: it would take
                # slots nobody gives back
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    self.slots.give(await take)
                raise
            if done:
                return take.result()
            self._expire_lost()
            if self._stopping:
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    k = await take
                    self.slots.give(k)
                return 0

    def _expire_lost(self) -> None:
        now = time.monotonic()
        for rid, r in list(self._requests.items()):
            if r.deadline < now:
                self._requests.pop(rid, None)
                self._release(r.remaining)
                if len(self._expired) >= MAX_EXPIRED:
                    self._expired.clear()  # very late statuses: rare, and only these
                self._expired.add(rid)

    def _release(self, k: int) -> None:
        """Give back ``k`` reserved-but-undelivered slots (never more than reserved)."""
        k = min(k, self.outstanding)
        self.outstanding -= k
        self.slots.give(k)

    async def stop(self) -> None:
        """Stop pulling. The inbox subscription goes with it, and the server drops a
        waiting pull request whose reply subject has no interest left, so nothing more
        is delivered to this loop; anything already on the way is nak'ed."""
        self._stopping = True
        await cancel_and_wait(self._task)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        self._release(self.outstanding)
        self._requests.clear()
