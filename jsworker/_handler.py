"""Handler registration and the per-handler runtime: its consumers, pull loops and
heartbeats. Each handler's runtime is independent of every other's, so a running worker
can gain, replace or lose one handler without touching the rest. A runtime gets a
:class:`~jsworker._env.RuntimeEnv` from its worker and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _names as n
from ._aio import cancel_and_wait
from ._dagnats import sanitize as sanitize_name
from ._duration import Duration, seconds
from ._env import RuntimeEnv
from ._errors import ConfigError, ConsumerConflictError, NotProvisionedError, ServerError
from ._pull import PullLoop, Slots
from ._ratelimit import RateLimit, check_limit
from ._retry import RetryPolicy

log = logging.getLogger("jsworker.handler")

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_ITERATIONS = 100
MAX_PARTITIONS = 256
_ERR_NOT_UNIQUE = 10100  # filtered consumer not unique on work-queue stream


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and its options, checked at registration time.

    ``ack_wait``: lease per delivery (default 30 s); heartbeats renew it every third.
    ``retry``: the retry policy (default: the worker's, itself 5 s fixed, 10 attempts).
    ``max_iterations``: bound for ``continue_`` loops (default 100).
    ``concurrency``: most tasks of this type leased at once (default: no cap of its
    own). Every handler draws from the worker-wide pool of ``concurrency`` credits too.
    ``partitions``: elastic partitions 1-256 (0: one shared consumer); ``singleton`` is
    one partition with at most one task running at a time.
    ``version``: 1, then +1 each time the handler's code is replaced on a live worker.
    ``rate_limit`` / ``key_rate_limit``: :class:`~jsworker.RateLimit` for the whole
    task type / per key (default: none); checked before the handler runs.
    """

    task_type: str
    fn: Callable[..., Any]
    is_async: bool
    ack_wait: float
    retry: RetryPolicy
    max_iterations: int
    singleton: bool = False
    concurrency: int | None = None
    partitions: int = 0
    version: int = 1
    rate_limit: RateLimit | None = None
    key_rate_limit: RateLimit | None = None

    @property
    def needs_new_consumer(self) -> tuple[object, ...]:
        """The options that shape the consumer or the group membership: changing one
        on a live worker re-creates the handler's runtime (drain, then start again)."""
        return (self.partitions, self.singleton, round(self.ack_wait, 3))

    def replacing(self, old: HandlerSpec) -> HandlerSpec:
        return replace(self, version=old.version + 1)


def validate_partitions(partitions: object, what: str = "partitions") -> int:
    if not isinstance(partitions, int) or isinstance(partitions, bool):
        raise ConfigError(f"{what} must be an int, got {partitions!r}")
    if not 0 <= partitions <= MAX_PARTITIONS:
        raise ConfigError(f"{what} must be between 0 and {MAX_PARTITIONS}, got {partitions}")
    return partitions


def make_spec(
    task_type: str,
    fn: Callable[..., Any],
    *,
    ack_wait: Duration | None,
    retry: RetryPolicy | None,
    max_iterations: int | None,
    default_ack_wait: float,
    default_retry: RetryPolicy,
    singleton: bool = False,
    concurrency: int | None = None,
    partitions: int = 0,
    rate_limit: object = None,
    key_rate_limit: object = None,
) -> HandlerSpec:
    n.validate_task_type(task_type)
    if not callable(fn):
        raise ConfigError(f"handler for {task_type!r} must be callable, got {type(fn).__name__}")
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )
    aw = default_ack_wait if ack_wait is None else seconds(ack_wait, name="ack_wait", minimum=0.5)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
    mi = DEFAULT_MAX_ITERATIONS if max_iterations is None else max_iterations
    if not isinstance(mi, int) or isinstance(mi, bool) or mi < 1:
        raise ConfigError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
    partitions = 1 if singleton else validate_partitions(partitions)
    rl = check_limit(rate_limit, "rate_limit", keyed=False)
    krl = check_limit(key_rate_limit, "key_rate_limit", keyed=True)
    return HandlerSpec(
        task_type,
        fn,
        is_async,
        aw,
        (retry or default_retry).validated(),
        mi,
        singleton,
        concurrency,
        partitions,
        rate_limit=rl,
        key_rate_limit=krl,
    )


class HandlerRuntime:
    """The running side of one handler: one durable consumer and pull loop per group
    (or one for all groups), plus a heartbeat loop for the tasks it holds.

    ``spec`` is read by the executor when a task starts, so assigning a new spec swaps
    the code for the next task while running ones finish on the old."""

    #: partitioned runtimes run a key's tasks one at a time and retry in place
    ordered = False

    def __init__(self, env: RuntimeEnv, spec: HandlerSpec) -> None:
        self.env = env
        self.spec = spec
        self.loops: list[PullLoop] = []
        self.inflight: dict[asyncio.Task[None], tuple[Msg, float]] = {}
        self._hb_task: asyncio.Task[None] | None = None
        self.consumers: list[str] = []
        self.slots = (
            Slots(spec.concurrency, parent=env.credits) if spec.concurrency else env.credits
        )
        #: set when the runtime starts draining: tasks not started yet are handed back,
        #: retry waits end early
        self.draining = asyncio.Event()
        #: grace for the next drain when it is not the worker's (``remove_handler``)
        self.drain_grace: float | None = None
        #: the AckWait of the consumer the tasks come from (heartbeats renew at a third);
        #: in DagNats mode the shared consumer's, whoever created it
        self.lease = spec.ack_wait

    @property
    def task_type(self) -> str:
        return self.spec.task_type

    def swap(self, spec: HandlerSpec) -> None:
        """Replace the code and per-task options (same consumer shape)."""
        assert spec.needs_new_consumer == self.spec.needs_new_consumer
        if spec.concurrency != self.spec.concurrency and self.slots is not self.env.credits:
            self.slots.resize(spec.concurrency or self.env.credits.size)
        self.spec = spec

    def _pull_loop(
        self,
        stream: str,
        consumer: str,
        dispatch: Callable[[Msg], None],
        *,
        expires: float,
        extra: Callable[[], dict[str, Any]] | None = None,
        on_status: Callable[[str, str, Msg], Awaitable[None]] | None = None,
    ) -> PullLoop:
        return PullLoop(
            self.env.nc,
            stream,
            consumer,
            self.slots,
            dispatch,
            spawn=self.env.supervisor.spawn,
            batch=min(self.env.batch, self.slots.size),
            expires=expires,
            extra=extra,
            on_status=on_status,
        )

    async def start(self) -> None:
        c = self.env.contract
        for group in self.env.groups:
            name = c.consumer_name(self.spec.task_type, group)
            await self._ensure_consumer(name, c.task_filter(self.spec.task_type, group))
            self.consumers.append(name)
        for name in self.consumers:
            loop = self._pull_loop(
                n.TASK_STREAM,
                name,
                self._dispatch,
                expires=self.env.pull_expires,
                on_status=self._on_status,
            )
            await loop.start()
            self.loops.append(loop)
        if c.dagnats and self.env.groups == (None,):
            await self._dagnats_sticky()
        self._start_heartbeats()

    async def _dagnats_sticky(self) -> None:
        """DagNats routes the later steps of a sticky run (``"sticky"`` on the workflow)
        to the worker that completed its first step, on ``sticky.{type}.{worker}.>`` of
        STICKY_TASKS, as its Go worker consumes them: an ephemeral consumer of this
        worker's own (the server removes it once idle). No stream, no sticky routing."""
        js = self.env.js
        name = f"sticky_{sanitize_name(self.spec.task_type)}_{self.env.worker_id}"
        cfg = ConsumerConfig(
            name=name,
            filter_subject=f"sticky.{self.spec.task_type}.{self.env.worker_id}.>",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.lease,
            inactive_threshold=120.0,
        )
        try:
            await js.add_consumer(n.STICKY_STREAM, cfg)
        except nats.js.errors.NotFoundError:
            return
        except nats.js.errors.APIError as e:
            log.warning("sticky consumer of %s not created: %s", self.task_type, e.description)
            return
        loop = self._pull_loop(n.STICKY_STREAM, name, self._dispatch, expires=self.env.pull_expires)
        await loop.start()
        self.loops.append(loop)

    def _start_heartbeats(self) -> None:
        self._hb_task = self.env.supervisor.spawn(f"heartbeat:{self.task_type}", self._heartbeats)

    async def _ensure_consumer(self, name: str, filt: str) -> None:
        if self.env.contract.dagnats:
            await self._bind_shared(name, filt)
            return
        js = self.env.js
        want = ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_waiting=512,
            description=f"jsworker: {self.spec.task_type}",
        )
        try:
            info = await js.consumer_info(n.TASK_STREAM, name)
        except nats.js.errors.NotFoundError as e:
            if getattr(e, "err_code", None) == 10059:  # stream not found
                raise NotProvisionedError(
                    f"stream {n.TASK_STREAM} does not exist: run `jsworker kv setup`"
                ) from None
            info = None
        if info is not None:
            have = info.config.filter_subject or ",".join(info.config.filter_subjects or [])
            if have != filt:
                raise ConsumerConflictError(
                    f"consumer {name!r} on {n.TASK_STREAM} filters {have!r}, not {filt!r}; "
                    "it was not created by jsworker for this task type. Remove or rename it."
                )
            if abs((info.config.ack_wait or 0) - self.spec.ack_wait) < 0.001:
                return
            log.info(
                "consumer %s: ack_wait %ss -> %ss", name, info.config.ack_wait, self.spec.ack_wait
            )
        try:
            await js.add_consumer(n.TASK_STREAM, want)
        except nats.js.errors.APIError as e:
            if e.err_code == _ERR_NOT_UNIQUE:
                raise ConsumerConflictError(
                    await _conflict_message(js, name, filt, self.spec.task_type, dagnats=False)
                ) from None
            raise ServerError(f"creating consumer {name!r} failed: {e.description}") from None

    async def _bind_shared(self, name: str, filt: str) -> None:
        """DagNats mode: the durable ``workers-{type}[-{group}]`` is shared with Go
        workers and the HTTP bridge. An existing one is used as it is (its settings are
        DagNats's; updating them would fight every Go worker's start); a missing one is
        created exactly as a Go worker creates it."""
        js = self.env.js
        try:
            info = await js.consumer_info(n.TASK_STREAM, name)
        except nats.js.errors.NotFoundError as e:
            if getattr(e, "err_code", None) == 10059:
                raise NotProvisionedError(
                    f"stream {n.TASK_STREAM} does not exist: is the DagNats engine running "
                    "on this server? (it creates its streams when it starts)"
                ) from None
            info = None
        if info is not None:
            have = info.config.filter_subject or ",".join(info.config.filter_subjects or [])
            if have != filt:
                raise ConsumerConflictError(
                    f"consumer {name!r} on {n.TASK_STREAM} filters {have!r}, not {filt!r}: "
                    "another task type or group maps to the same DagNats consumer name"
                )
            self.lease = float(info.config.ack_wait or self.lease)
            return
        from ._dagnats import DEFAULT_ACK_WAIT

        want = ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=DEFAULT_ACK_WAIT,
            max_deliver=-1,
        )
        try:
            await js.add_consumer(n.TASK_STREAM, want)
        except nats.js.errors.APIError as e:
            if e.err_code == _ERR_NOT_UNIQUE:
                raise ConsumerConflictError(
                    await _conflict_message(js, name, filt, self.spec.task_type, dagnats=True)
                ) from None
            raise ServerError(f"creating consumer {name!r} failed: {e.description}") from None
        self.lease = DEFAULT_ACK_WAIT

    def _dispatch(self, msg: Msg) -> None:
        task = asyncio.create_task(self.env.executor.execute(self, msg))
        self.inflight[task] = (msg, time.monotonic())
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)
        self.slots.give(1)

    async def _on_status(self, code: str, desc: str, msg: Msg) -> None:
        if code == "409" and "Deleted" in desc:
            # Not just a log line: the consumer is recreated so the worker keeps working,
            # and the event is counted in the worker's health.
            self.env.health.consumer_deleted += 1
            log.error("consumer for %s was deleted; recreating it", self.spec.task_type)
            try:
                c = self.env.contract
                for group in self.env.groups:
                    await self._ensure_consumer(
                        c.consumer_name(self.spec.task_type, group),
                        c.task_filter(self.spec.task_type, group),
                    )
            except Exception as e:
                self.env.health.last_error = f"recreating consumer of {self.task_type}: {e}"
                log.exception("recreating the consumer of %s failed", self.task_type)
        elif code == "409":
            log.debug("pull %s: 409 %s", self.spec.task_type, desc)

    async def _heartbeats(self) -> None:
        """Renew the lease of every task held longer than a third of AckWait, so a live
        worker's task is never redelivered; a dead worker stops renewing, and the task
        is redelivered about one AckWait later."""
        while True:
            every = self.lease / 3
            await asyncio.sleep(every)
            now = time.monotonic()
            extended = 0
            for msg, started in self.held():
                if now - started >= every * 0.9:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                        extended += 1
            self.env.telemetry.count_lease_extensions(self.task_type, extended)

    def held(self) -> list[tuple[Msg, float]]:
        """Every message this handler holds a lease on (running or waiting)."""
        return list(self.inflight.values())

    def task_subject(self, msg: Msg) -> str:
        """The task's subject on ``task.>`` (partitioned streams prefix a partition; a
        sticky task's is its ``Jsworker-Task-Subject`` header)."""
        s = msg.subject
        if s.startswith("sticky.") and self.env.contract.dagnats:
            return s  # the engine's sticky.{type}.{worker}.{run}: no home subject header
        if s.startswith("sticky."):
            from ._sticky import home_subject  # _sticky builds on this module

            return home_subject(s, msg.headers)
        return s

    def describe(self) -> dict[str, object]:
        """Partitions held, by elastic group (empty when not partitioned)."""
        return {}

    async def stop_pulling(self) -> None:
        await asyncio.gather(*(lp.stop() for lp in self.loops))

    async def drain(self, grace: float) -> None:
        """Stop taking tasks, let running ones finish within ``grace`` seconds (their
        leases are renewed meanwhile), hand back (nak) the rest, release everything.
        Used by ``Worker.stop`` and by removing or re-creating a live handler."""
        self.draining.set()
        await self.stop_pulling()
        pending = list(self.inflight)
        if pending:
            # grace 0 means none: asyncio.wait(timeout=0) returns at once
            _, late = await asyncio.wait(pending, timeout=grace)
            for t in late:
                t.cancel()  # the executor naks a task cancelled while draining
            if late:
                await asyncio.wait(late, timeout=5)
        await self.stop()

    async def stop(self) -> None:
        await self.stop_pulling()
        await cancel_and_wait(self._hb_task)
        self._hb_task = None


def filters_overlap(a: str, b: str) -> bool:
    """Whether two subject filters can match one subject (``*``: a token, ``>``: the
    rest), as the server decides a work-queue stream's consumers overlap."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(ta) == len(tb)


async def _conflict_message(js: Any, name: str, filt: str, task_type: str, *, dagnats: bool) -> str:
    """One line: which consumer already takes these tasks, whose it is, what to do."""
    others: list[tuple[str, str]] = []
    with contextlib.suppress(Exception):  # the message must not fail: name what we can
        for ci in await js.consumers_info(n.TASK_STREAM):
            cfg = ci.config
            fs = [cfg.filter_subject] if cfg.filter_subject else list(cfg.filter_subjects or [])
            if ci.name != name and any(filters_overlap(f, filt) for f in fs):
                others.append((ci.name, ",".join(fs)))
    head = f"cannot create consumer {name!r} (filter {filt!r}) for {task_type!r}: "
    if not others:
        return head + (
            f"another consumer on the work-queue stream {n.TASK_STREAM} overlaps it "
            "(every worker of a task type must use the same groups, or none)"
        )
    who = ", ".join(f"{o!r} (filter {f!r})" for o, f in others)
    o, f = others[0]
    if o.startswith("workers-") and not dagnats:
        hint = "that is DagNats's consumer: start this worker with --engine dagnats"
    elif dagnats:
        hint = (
            "a standalone jsworker worker (or a partitioned group) of this type holds it: "
            "stop it, or run every worker of this type in the same mode"
        )
    elif f == f"task.{task_type}.>":
        hint = (
            "a worker without groups takes every task of this type: stop it, or give "
            "every worker of this type the same groups (or none)"
        )
    else:
        hint = (
            "workers with other groups serve this type: give this worker groups too "
            "(a worker without groups cannot share a type with grouped ones), or stop them"
        )
    return head + f"{who} overlaps it and already takes these tasks on {n.TASK_STREAM}; {hint}"
