"""Handler registration and the per-handler runtime: its consumers, pull loops and
heartbeats. Each handler's runtime is independent of every other's, so a running worker
can gain, replace or lose one handler without touching the rest."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _names as n
from ._aio import cancel_and_wait
from ._duration import Duration, seconds
from ._errors import ConfigError, ConsumerConflictError, NotProvisionedError, ServerError
from ._pull import PullLoop, Slots
from ._retry import RetryPolicy

if TYPE_CHECKING:
    from ._worker import Worker

log = logging.getLogger("jsworker.handler")

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_ITERATIONS = 100
_ERR_NOT_UNIQUE = 10100  # filtered consumer not unique on work-queue stream


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler and its options, checked at registration time.

    ``ack_wait``: lease per delivery (default 30 s); heartbeats renew it every third.
    ``retry``: the retry policy (default: the worker's, itself 5 s fixed, 10 attempts).
    ``max_iterations``: bound for ``continue_`` loops (default 100).
    ``concurrency``: most tasks of this type pulled at once (default: the worker's
    ``concurrency``). The worker-wide ``concurrency`` still bounds how many *run*;
    pulled tasks waiting for a run slot are heartbeated like running ones.
    """

    task_type: str
    fn: Callable[..., Any]
    is_async: bool
    ack_wait: float
    retry: RetryPolicy
    max_iterations: int
    singleton: bool = False
    concurrency: int | None = None


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
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
    return HandlerSpec(
        task_type,
        fn,
        is_async,
        aw,
        (retry or default_retry).validated(),
        mi,
        singleton,
        concurrency,
    )


class HandlerRuntime:
    """The running side of one handler: one durable consumer and pull loop per group
    (or one for all groups), plus a heartbeat loop for its in-flight tasks."""

    #: partitioned runtimes run a key's tasks one at a time and retry in place
    ordered = False

    def __init__(self, worker: Worker, spec: HandlerSpec) -> None:
        self.worker = worker
        self.spec = spec
        self.loops: list[PullLoop] = []
        self.inflight: dict[asyncio.Task[None], tuple[Msg, float]] = {}
        self._hb_task: asyncio.Task[None] | None = None
        self.consumers: list[str] = []
        self.slots = Slots(spec.concurrency or worker.concurrency)

    @property
    def groups(self) -> tuple[str | None, ...]:
        return self.worker.groups or (None,)

    async def start(self) -> None:
        for group in self.groups:
            name = n.consumer_name(self.spec.task_type, group)
            await self._ensure_consumer(name, n.task_filter(self.spec.task_type, group))
            self.consumers.append(name)
        for name in self.consumers:
            loop = PullLoop(
                self.worker.nc,
                n.TASK_STREAM,
                name,
                self.slots,
                self._dispatch,
                batch=min(self.worker.batch, self.slots.size),
                expires=self.worker.pull_expires,
                on_status=self._on_status,
            )
            await loop.start()
            self.loops.append(loop)
        self._hb_task = asyncio.create_task(self._heartbeats(), name=f"hb:{self.spec.task_type}")

    async def _ensure_consumer(self, name: str, filt: str) -> None:
        js = self.worker.js
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
                    f"cannot create consumer {name!r} (filter {filt!r}): another consumer on the "
                    f"work-queue stream {n.TASK_STREAM} overlaps it. A worker without groups "
                    f"(filter task.{self.spec.task_type}.>) and workers with groups cannot serve "
                    "the same task type at once: give every worker of this type groups, or none."
                ) from None
            raise ServerError(f"creating consumer {name!r} failed: {e.description}") from None

    def _dispatch(self, msg: Msg) -> None:
        task = asyncio.create_task(self.worker._execute(self, msg))
        self.inflight[task] = (msg, time.monotonic())
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)
        self.slots.give(1)

    async def _on_status(self, code: str, desc: str, msg: Msg) -> None:
        if code == "409" and "Deleted" in desc:
            # Not just a log line: the consumer is recreated so the worker keeps working,
            # and the event is counted in the worker's health.
            self.worker.health.consumer_deleted += 1
            log.error("consumer for %s was deleted; recreating it", self.spec.task_type)
            with contextlib.suppress(Exception):
                for group in self.groups:
                    await self._ensure_consumer(
                        n.consumer_name(self.spec.task_type, group),
                        n.task_filter(self.spec.task_type, group),
                    )
        elif code == "409":
            log.debug("pull %s: 409 %s", self.spec.task_type, desc)

    async def _heartbeats(self) -> None:
        """Renew the lease of every task running longer than a third of AckWait, so a
        live worker's task is never redelivered; a dead worker stops renewing, and the
        task is redelivered about one AckWait later."""
        every = self.spec.ack_wait / 3
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for msg, started in self.held():
                if now - started >= every * 0.9:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    def held(self) -> list[tuple[Msg, float]]:
        """Every message this handler holds a lease on (running or waiting)."""
        return list(self.inflight.values())

    def task_subject(self, msg: Msg) -> str:
        """The task's subject on ``task.>`` (partitioned streams prefix a partition)."""
        return msg.subject

    def describe(self) -> dict[str, object]:
        return {}

    async def stop_pulling(self) -> None:
        await asyncio.gather(*(lp.stop() for lp in self.loops))

    async def stop(self) -> None:
        await self.stop_pulling()
        await cancel_and_wait(self._hb_task)
        self._hb_task = None
