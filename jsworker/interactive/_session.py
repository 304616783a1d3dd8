"""The interactive session shared by the REPL and the notebook: a connection (to a URL or
to an embedded server), a live :class:`~jsworker.Worker` that starts with no handlers,
a :class:`~jsworker.Client`, and the helpers a person types: ``handle``, ``remove``,
``status``, ``submit``, ``tail``, ``partitions``.

Everything runs on the caller's event loop (the kernel's or the REPL's): nothing here
calls ``asyncio.run`` or nests loops. Registering a handler is synchronous (so it works
as a decorator) and only *schedules* the change on the running worker; the REPL and the
notebook await :meth:`Session.sync` after every statement/cell that registered one, so a
failure to create the consumer is raised where the handler was defined.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import getpass
import inspect
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS

from .. import _names as n
from .._client import Client, TaskHandle, no_worker_message
from .._context import TaskContext
from .._errors import ConfigError, JSWorkerError, LifecycleError, ServerError
from .._netcheck import HINT, scheme_problem, unreachable
from .._provision import setup_all
from .._redact import redact_urls
from .._server import EmbeddedServer
from .._worker import Worker

F = TypeVar("F", bound=Callable[..., Any])

#: outcomes kept for the displays (most recent last)
RECENT = 50


def dev_group(user: str | None = None) -> str:
    """``dev-<user>``: a private worker group for prototyping (see docs/interactive-mode.md).

    The user name is reduced to what a group name may hold (letters, digits, ``-_``)."""
    raw = user if user is not None else getpass.getuser()
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-") or "user"
    return n.validate_group(f"dev-{cleaned}")


def print_event(ev: dict[str, Any]) -> None:
    """One event as one line (the default ``echo`` of :meth:`Session.tail`)."""
    p = _payload(ev)
    detail = ""
    if "output" in p:
        detail = _short(p["output"])
    if p.get("error"):
        detail = f"{p.get('kind', '')}: {p['error']}"
    ts = str(ev.get("timestamp", ""))[11:23]
    print(
        f"{ts}  {ev.get('type', '?'):15} {p.get('task_type', '')} {ev.get('run_id', '')}"
        f"  {detail}".rstrip()
    )


@dataclass(frozen=True)
class RecentOutcome:
    """One execution of a handler in this session (kept for the displays)."""

    task_type: str
    version: int
    run_id: str
    key: str | None
    kind: str  # "complete" or the outcome/exception that ended it
    detail: str
    seconds: float
    at: float = field(default_factory=time.time)


class Events(list[dict[str, Any]]):
    """The events :meth:`Session.tail` followed: a list of event dicts. Echoed at a
    prompt or as a cell's value it is one line (the events were printed as they came),
    not the raw list again."""

    run_id: str | None = None

    def __repr__(self) -> str:
        kinds = collections.Counter(str(e.get("type", "?")) for e in self)
        what = ", ".join(f"{k} {v}" for k, v in kinds.most_common())
        of = f" of {self.run_id}" if self.run_id else ""
        n = len(self)
        return (
            f"<{n} event{'' if n == 1 else 's'}{of}"
            + (f": {what} (a list of dicts; _[0] is the first)" if what else "")
            + ">"
        )

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"


class Session:
    """A connection plus a live worker, for a person at a prompt or in a notebook.

    Create one with :func:`connect` (or ``%jsworker connect`` in a notebook).
    ``session.worker`` is the :class:`~jsworker.Worker`, ``session.client`` a
    :class:`~jsworker.Client`, ``session.nc`` the NATS connection.
    """

    def __init__(
        self,
        nc: NATS,
        worker: Worker,
        *,
        url: str,
        group: str | None,
        server: EmbeddedServer | None = None,
    ) -> None:
        self.nc = nc
        self.worker = worker
        #: no Python warning: submit prints the no-worker warning as a line itself
        self.client = Client(nc, warn_no_worker=False)
        self.url = url
        self.group = group
        self.server = server
        #: the loop the worker runs on (the kernel's or the REPL's)
        self.loop = asyncio.get_running_loop()
        self.recent: collections.deque[RecentOutcome] = collections.deque(maxlen=RECENT)
        self._dirty = False
        self._closed = False

    # ------------------------------------------------------------- handlers
    def handle(self, task_type: str, fn: F | None = None, **options: Any) -> Any:
        """Register (or redefine) ``fn`` for ``task_type`` on the live worker; usable as
        ``@session.handle("type")``. Options as :meth:`Worker.handle`, e.g.
        ``partitions=8``. Bad names/options raise here; a consumer that cannot be
        created is raised by the next :meth:`sync` (the REPL and the notebook call it
        after the statement or cell)."""
        return self._register(task_type, fn, singleton=False, options=options)

    def handle_singleton(self, task_type: str, fn: F | None = None, **options: Any) -> Any:
        """As :meth:`handle`, with at most one execution at a time across all workers."""
        return self._register(task_type, fn, singleton=True, options=options)

    def _register(
        self, task_type: str, fn: F | None, *, singleton: bool, options: dict[str, Any]
    ) -> Any:
        n.validate_task_type(task_type)
        if fn is None:

            def deco(f: F) -> F:
                self._register(task_type, f, singleton=singleton, options=options)
                return f

            return deco
        self._check_open()
        # the worker numbers versions 1, 2, ... per registered type; the wrapper records
        # the one this registration will get
        current = {h["task_type"]: h["version"] for h in self.worker.handler_info()}
        wrapped = self._recording(task_type, fn, int(current.get(task_type, 0)) + 1)
        if singleton:
            self.worker.handle_singleton(task_type, wrapped, **options)
        else:
            self.worker.handle(task_type, wrapped, **options)
        self._dirty = True
        return fn

    async def remove(self, task_type: str) -> None:
        """Withdraw the handler: in-flight tasks finish (grace period), tasks pulled but
        not started are handed back, the partition group is left so the other members
        take its partitions over. ``ConfigError`` for a type this session does not
        handle."""
        self._check_open()
        await self.worker.remove_handler(task_type)

    @property
    def pending(self) -> bool:
        """True when a registration was made and not yet confirmed by :meth:`sync`."""
        return self._dirty

    async def sync(self) -> None:
        """Wait until every registration made so far is applied on the worker; raise the
        first failure (``ConsumerConflictError``, ``NotProvisionedError``, ...)."""
        self._dirty = False
        if not self._closed:
            await self.worker.sync()

    def _recording(
        self, task_type: str, fn: Callable[..., Any], version: int
    ) -> Callable[..., Any]:
        """``fn`` wrapped to record each execution in :attr:`recent` (for the displays).
        Async stays async and sync stays sync, so the worker runs it as it would ``fn``."""
        recent = self.recent

        def note(ctx: TaskContext, t0: float, kind: str, detail: str) -> None:
            if ctx.outcome is not None and kind == "complete":
                kind = ctx.outcome.kind
                detail = ctx.outcome.error or _short(ctx.outcome.output)
            subject = ctx.info.subject.split(".")
            recent.append(
                RecentOutcome(
                    task_type,
                    version,
                    ctx.run_id,
                    subject[-1] if len(subject) >= 3 else None,
                    kind,
                    detail,
                    time.monotonic() - t0,
                )
            )

        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - objects with an async __call__
        ):

            @functools.wraps(fn)
            async def arun(ctx: TaskContext) -> Any:
                t0 = time.monotonic()
                try:
                    out = await fn(ctx)
                except BaseException as e:
                    note(ctx, t0, type(e).__name__, str(e))
                    raise
                note(ctx, t0, "complete", _short(out))
                return out

            return arun

        @functools.wraps(fn)
        def run(ctx: TaskContext) -> Any:
            t0 = time.monotonic()
            try:
                out = fn(ctx)
            except BaseException as e:
                note(ctx, t0, type(e).__name__, str(e))
                raise
            note(ctx, t0, "complete", _short(out))
            return out

        return run

    # ------------------------------------------------------------ using it
    async def submit(
        self,
        task_type: str,
        input: Any = None,
        *,
        key: str | None = None,
        group: str | None = None,
        wait: bool | float = False,
        **kw: Any,
    ) -> Any:
        """Submit a task (to the session's group unless ``group=`` says otherwise).
        Returns the :class:`TaskHandle`; with ``wait=True`` (or a number of seconds,
        default 30 for True) the task's output instead (``TaskFailed`` on failure)."""
        self._check_open()
        h = await self.client.submit(
            task_type, input, key=key, group=group if group is not None else self.group, **kw
        )
        if h.listening is False:
            print(f"Warning: {no_worker_message(h.subject)}")
        if wait is False:
            return h
        timeout = 30.0 if wait is True else float(wait)
        # each retry is printed as it happens, not only the final outcome
        retries = asyncio.ensure_future(h.follow_retries(print))
        try:
            return await h.result(timeout=timeout)
        finally:
            retries.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await retries

    async def tail(
        self,
        target: str | TaskHandle | None = None,
        *,
        seconds: float = 10.0,
        count: int | None = None,
        echo: Callable[[dict[str, Any]], None] | None = print_event,
    ) -> Events:
        """Follow lifecycle events and return them (an :class:`Events` list, shown as a
        one-line summary: each event was already printed as it came).

        ``target``: a :class:`TaskHandle` or run id (that run's events from its first
        one; stops at its outcome), or ``None`` for every run's live events. Stops after
        ``seconds`` of waiting or ``count`` events; each event is passed to ``echo``
        (printed as one line by default; ``None`` to stay quiet)."""
        self._check_open()
        got = Events()
        if isinstance(target, TaskHandle):
            run_id: str | None = target.run_id
        else:
            run_id = target

        def keep(ev: dict[str, Any]) -> bool:
            got.append(ev)
            if echo is not None:
                echo(ev)
            return count is not None and len(got) >= count

        async def follow() -> None:
            if run_id is not None:
                async for ev in self.client.run_events(run_id, timeout=seconds):
                    if not isinstance(ev, dict):
                        continue  # not an event (a foreign publisher): skipped
                    if keep(ev) or _final(ev):
                        return
                return
            queue: asyncio.Queue[bytes] = asyncio.Queue()

            async def cb(msg: Any) -> None:
                queue.put_nowait(msg.data)

            sub = await self.nc.subscribe("history.>", cb=cb)
            try:
                while True:
                    data = await queue.get()
                    with contextlib.suppress(ValueError):
                        if keep(_loads(data)):
                            return
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        got.run_id = run_id
        if run_id is not None:
            await follow()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follow(), seconds)
        return got

    async def partitions(self, task_type: str, group: str | None = None) -> dict[str, Any]:
        """The elastic group of a partitioned type, as every member sees it: members,
        partition -> member, whether each partition is consumed, pending per partition
        (the same view as ``jsworker partitions show``)."""
        from ..cli._output import CLIError
        from ..cli._partitions import group_view

        n.validate_task_type(task_type)
        try:
            return await group_view(self.nc, n.consumer_name(task_type, group))
        except CLIError as e:
            raise ConfigError(e.format_message()) from None

    async def partition_map(self, task_type: str, group: str | None = None) -> Any:
        """The group's map as a :class:`~jsworker.interactive.GroupMap` (members ->
        partitions; shown as a table in a notebook), for any partitioned type, also
        one this session does not handle."""
        from ._display import group_map

        return await group_map(self, task_type, group)

    def handlers(self) -> list[dict[str, Any]]:
        """The worker's handlers (``Worker.handler_info()``)."""
        return list(self.worker.handler_info())

    async def snapshot(self) -> Any:
        """Everything the displays show, read now (see :mod:`._display`)."""
        from ._display import take_snapshot

        return await take_snapshot(self)

    async def status(self) -> Any:
        """A :class:`~jsworker.interactive.Snapshot`: shown as a table in a notebook and
        printed by the REPL."""
        return await self.snapshot()

    # ------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise LifecycleError("this session is closed: connect again")

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, grace_period: float | None = None) -> None:
        """Leave cleanly: stop the worker (in-flight tasks get the grace period; every
        partition group is left so the other members take over), close the connection,
        stop the embedded server if this session started one. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.worker.stop(grace_period)
        finally:
            with contextlib.suppress(Exception):
                await self.nc.close()
            if self.server is not None:
                await self.server.stop()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.worker.running else "stopped")
        return (
            f"<jsworker session {self.worker.worker_id} {state} on {self.url}"
            f"{' group ' + self.group if self.group else ''}, handlers {self.worker.task_types}>"
        )

    def _repr_html_(self) -> str:
        from ._display import session_html

        return session_html(self)


async def connect(
    url: str | None = None,
    *,
    group: str | None = None,
    worker_id: str | None = None,
    grace_period: float = 10.0,
    heartbeat_interval: float = 5.0,
    provision: bool | None = None,
    **worker_options: Any,
) -> Session:
    """Open an interactive session on the running event loop.

    ``url``: a NATS server URL; ``None`` starts an embedded ``nats-server`` (stopped
    with the session). ``group``: serve and submit to this worker group only, e.g.
    :func:`dev_group` for a private prototype. ``provision`` creates the streams and
    buckets (default: only on an embedded server). Other keyword arguments go to
    :class:`~jsworker.Worker` (``concurrency``, ``ack_wait``, ...). The worker is
    started with no handlers; register them with :meth:`Session.handle`.

    Raises :class:`JSWorkerError` subclasses (``NotProvisionedError`` when the server
    lacks the streams) and ``ServerError`` when the server cannot be reached.
    """
    server: EmbeddedServer | None = None
    if url is None:
        server = await EmbeddedServer().start()
        url = server.url
        provision = True if provision is None else provision
    try:
        nc = await _connect(url)
        try:
            if provision:
                await setup_all(nc)
            worker = Worker(
                nc,
                groups=[group] if group else None,
                worker_id=worker_id,
                grace_period=grace_period,
                heartbeat_interval=heartbeat_interval,
                **worker_options,
            )
            await worker.start()
        except BaseException:
            await nc.close()
            raise
    except BaseException:
        if server is not None:
            await server.stop()
        raise
    session = Session(nc, worker, url=redact_urls(url), group=group, server=server)
    _install_ipython_hooks(session)
    return session


async def _connect(url: str) -> NATS:
    async def quiet(e: Exception) -> None:  # nats-py logs a traceback by default
        return None

    servers = [u.strip() for u in url.split(",") if u.strip()]
    bad_scheme = scheme_problem(servers)
    if bad_scheme is not None:
        raise ServerError(bad_scheme)
    try:
        nc = await nats.connect(
            servers,
            name="jsworker-interactive",
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,  # nats-py waits this long before giving up (2 s)
            error_cb=quiet,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError):
        raise ServerError(unreachable(url, servers, HINT)) from None
    # reconnect for good once the first connection worked (as `jsworker serve` does)
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 1.0
    return nc


def _install_ipython_hooks(session: Session) -> None:
    """Inside IPython, make every cell await :meth:`Session.sync` (errors of a live
    registration show in the cell that made it). Does not import IPython otherwise."""
    if "IPython" not in sys.modules:
        return
    from ._magics import attach

    attach(session)


def _payload(ev: dict[str, Any]) -> dict[str, Any]:
    """An event's payload; anything but an object (from a foreign publisher) is empty."""
    p = ev.get("payload")
    return p if isinstance(p, dict) else {}


def _final(ev: dict[str, Any]) -> bool:
    et = ev.get("type")
    kind = _payload(ev).get("kind")
    return et in ("step.completed", "step.cancelled") or (
        et == "step.failed" and kind in ("non_retriable", "exhausted", "invalid_payload")
    )


def _loads(data: bytes) -> dict[str, Any]:
    v = json.loads(data)
    if not isinstance(v, dict):
        raise ValueError("not an object")
    return v


def _short(v: Any, width: int = 80) -> str:
    try:
        s = json.dumps(v, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= width else s[: width - 1] + "…"


__all__ = ["JSWorkerError", "RecentOutcome", "Session", "connect", "dev_group", "print_event"]
