"""Pipelined JetStream publishes: one reply subscription, one future per publish.

``js.publish`` is a request: a future, a ``wait_for`` timer and a task switch per
message, and the caller waits a round trip before it can do anything else. Here every
publish of a connection gets its reply subject under one wildcard inbox
(``{inbox}.{n}``), its future is kept in a dict keyed by ``n``, and the PubAck (or the
server's error) resolves it when it arrives. Publishes from many tasks in flight go out
in the connection's pending buffer, which nats-py writes to the socket in one write per
event-loop pass, and their PubAcks come back the same way.

Timeouts do not cost a timer each: futures are kept in publish order, all with the same
timeout, so one timer, armed for the oldest, fails every expired future with
:class:`nats.errors.TimeoutError` and re-arms itself for the next one.

Errors are those of ``js.publish``: ``NoStreamResponseError`` when no stream captures
the subject, :class:`nats.js.errors.APIError` for a stored error reply (so callers can
tell a permanent one, e.g. a message over the stream's ``max_msg_size``, from a
transient one), :class:`nats.errors.TimeoutError` when no reply came in time. A
publish that cannot be sent at all raises from :meth:`PubAcks.publish` itself.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import NamedTuple

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

STATUS = "Status"
NO_RESPONDERS = "503"


_CRLF = b"\r\n"
_HDR_LINE = b"NATS/1.0\r\n"


def header_block(headers: dict[str, str]) -> bytes | None:
    """``headers`` as the protocol's header block, or ``None`` when a key or value needs
    nats-py's cleaning (surrounding spaces, CR/LF, an empty or unusual key)."""
    if len(headers) == 1:
        msg_id = headers.get("Nats-Msg-Id")
        if msg_id is not None:  # the usual case: a dedup id alone
            if "\r" in msg_id or "\n" in msg_id or msg_id != msg_id.strip():
                return None
            return b"%bNats-Msg-Id: %b\r\n\r\n" % (_HDR_LINE, msg_id.encode())
    out = bytearray(_HDR_LINE)
    for k, v in headers.items():
        if not k or not k.isascii() or not k.replace("-", "").isalnum():
            return None
        if "\r" in v or "\n" in v or v != v.strip():
            return None
        out += f"{k}: {v}\r\n".encode()
    out += _CRLF
    return bytes(out)


async def publish(
    nc: NATS,
    subject: str,
    data: bytes = b"",
    *,
    reply: str = "",
    headers: dict[str, str] | None = None,
) -> None:
    """``nc.publish`` without its per-message overhead, for subjects and headers jsworker
    built and checked itself (the outcome recorder checks every subject and size first).

    The protocol command is built here and handed to the connection's pending buffer,
    which the connection's flusher writes to the socket once per event-loop pass with
    everything else queued meanwhile (acks, events, pull requests of every task in
    flight). Anything unusual takes ``nc.publish`` itself: not connected (nats-py
    buffers or refuses while reconnecting), closed or draining, a body over
    ``max_payload``, headers that need cleaning, or a nats-py without these internals."""
    hdr = b"" if headers is None else header_block(headers)
    send = getattr(nc, "_send_command", None)
    if (
        hdr is None
        or send is None
        or not nc.is_connected
        or nc.is_draining_pubs
        or len(data) > nc.max_payload
        or not subject
    ):
        await nc.publish(subject, data, reply=reply, headers=headers)
        return
    subj = subject.encode()
    if reply:
        subj += b" " + reply.encode()
    if hdr:
        hl = len(hdr)
        cmd = b"HPUB %b %d %d\r\n%b%b\r\n" % (subj, hl, hl + len(data), hdr, data)
    else:
        cmd = b"PUB %b %d\r\n%b\r\n" % (subj, len(data), data)
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(data)
    await send(cmd)
    queue = nc._flush_queue
    if queue is not None and queue.empty():
        await nc._flush_pending()


async def ack(msg: Msg) -> None:
    """``msg.ack()`` through :func:`publish` (an empty body on the reply subject is an
    ack). Raises nats-py's ``MsgAlreadyAckdError`` for a message already acknowledged."""
    if msg._ackd:
        raise nats.errors.MsgAlreadyAckdError(msg)
    if not msg.reply or msg._client is None:
        await msg.ack()  # nats-py says what is wrong
        return
    await publish(msg._client, msg.reply)
    msg._ackd = True


class PubAck(NamedTuple):
    stream: str
    seq: int
    duplicate: bool


class PubAcks:
    """Pipelined JetStream publishes for one connection (see the module docstring).

    ``timeout`` bounds the wait for each PubAck (``js.publish``'s default is 5 s)."""

    def __init__(self, nc: NATS, timeout: float = 5.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._skip = 0
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()
        self._next = 0
        #: token -> (future, deadline); insertion order is deadline order
        self._pending: dict[str, tuple[asyncio.Future[PubAck], float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def _start(self) -> None:
        async with self._lock:
            if self._sub is not None:
                return
            prefix = self.nc.new_inbox() + "."
            self._sub = await self.nc.subscribe(prefix + "*", cb=self._on_reply)
            self._prefix = prefix
            self._skip = len(prefix)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        """Send one JetStream publish; returns the future of its PubAck. Raises at once
        when the message cannot be sent (bad subject or header, over ``max_payload``,
        connection closed)."""
        if self._sub is None:
            await self._start()
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PubAck] = loop.create_future()
        self._pending[token] = (fut, loop.time() + self.timeout)
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + self.timeout, self._expire)
        try:
            await publish(self.nc, subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            fut.cancel()
            raise
        return fut

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> PubAck:
        """Publish and wait for the PubAck (the pipelined form of ``js.publish``)."""
        return await (await self.publish(subject, data, headers))

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[self._skip :], None)
        if entry is None:
            return  # timed out already, or not ours
        fut = entry[0]
        if fut.done():
            return
        hdr = msg.headers
        if not msg.data:
            if hdr and hdr.get(STATUS) == NO_RESPONDERS:
                fut.set_exception(nats.js.errors.NoStreamResponseError())
            else:
                fut.set_exception(nats.errors.Error(f"empty PubAck ({hdr or {}})"))
            return
        try:
            resp = orjson.loads(msg.data)
            if not isinstance(resp, dict):
                raise ValueError("not an object")
            if "error" in resp:
                try:
                    # raises the error's class (400 -> BadRequestError, ...)
                    nats.js.errors.APIError.from_error(resp["error"])
                except nats.js.errors.APIError as e:
                    fut.set_exception(e)
                    return
                raise ValueError("an error reply nats-py could not read")
            ack = PubAck(str(resp["stream"]), int(resp["seq"]), bool(resp.get("duplicate")))
        except (ValueError, KeyError, TypeError) as e:
            fut.set_exception(nats.errors.Error(f"malformed PubAck {msg.data[:200]!r}: {e}"))
            return
        fut.set_result(ack)

    def _expire(self) -> None:
        """Fail every future past its deadline; re-arm for the oldest one left."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._pending
        while pending:
            token = next(iter(pending))
            fut, deadline = pending[token]
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire)
                return
            del pending[token]
            if not fut.done():
                fut.set_exception(nats.errors.TimeoutError())

    async def close(self) -> None:
        """Unsubscribe and fail what is still waiting (``TimeoutError``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(nats.errors.TimeoutError())
        self._pending.clear()
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # connection closed: nothing to unsubscribe from
                pass


_shared: weakref.WeakKeyDictionary[NATS, PubAcks] = weakref.WeakKeyDictionary()


def shared_pubacks(nc: NATS) -> PubAcks:
    """The connection's one :class:`PubAcks` for clients (one reply subscription per
    connection, however many ``Client`` objects are made on it; never closed, it goes
    with the connection)."""
    pub = _shared.get(nc)
    if pub is None:
        pub = _shared[nc] = PubAcks(nc)
    return pub
