"""The worker: registers handlers, runs them against JetStream, applies outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar, overload

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from . import _names as n
from . import _wire as w
from ._cancel import CancelWatcher
from ._context import Outcome, TaskCancelledError, TaskContext, TaskInfo
from ._directory import Directory
from ._duration import Duration, seconds
from ._errors import (
    ConfigError,
    LifecycleError,
    PayloadError,
    PermanentError,
    RetryableError,
)
from ._handler import DEFAULT_ACK_WAIT, HandlerRuntime, HandlerSpec, make_spec
from ._outcomes import OutcomeRecorder, attempt_suffix
from ._partitions import PartitionedRuntime
from ._provision import require_stream
from ._retry import RetryPolicy, clamp_retry_after
from ._services import Services
from ._stats import WorkerHealth, WorkerStats
from ._telemetry import Telemetry

log = logging.getLogger("jsworker.worker")
F = TypeVar("F", bound=Callable[..., Any])
MAX_PARTITIONS = 256


class Worker:
    """Runs task handlers on NATS JetStream.

    Args:
        nc: a connected ``nats.aio.client.Client`` (``None`` raises ``ConfigError``).
        telemetry: a :class:`Telemetry`; ``None`` (default) means no-op.
        groups: worker groups to serve (default: all). With ``("gpu",)`` the worker
            consumes ``task.{type}.gpu.>`` only. Empty names are refused; passing an
            explicitly empty list is refused too (omit it for all groups).
        partitions: elastic partitions 1-256 for every handler (orbit.go ``pcgroups``
            compatible, rebalanced across live workers, per-key order); 0 (default) is
            one shared consumer per task type and group.
        concurrency: tasks run at once across all handlers (default 64).
        ack_wait: default lease per delivery (default 30 s); per handler ``ack_wait=``.
        retry: default :class:`RetryPolicy` (5 s fixed, 10 attempts).
        max_iterations: default bound for ``continue_`` (100).
        grace_period: how long ``stop()`` lets in-flight tasks finish (default 10 s,
            must be > 0); what is still running then is nak'ed for immediate redelivery.
        batch: most messages one pull request asks for (default 256).
        worker_id: default ``worker-{16 hex}``.
        heartbeat_interval: how often the worker directory entry is refreshed (default
            30 s). A partition member whose entry is older than 3x this (at most 60 s,
            the bucket TTL) is considered dead and its partitions are moved.

    Handlers must be registered before :meth:`start`; ``start`` raises when there are
    none. ``stop`` is idempotent and safe before ``start``.
    """

    def __init__(
        self,
        nc: NATS | None,
        telemetry: Telemetry | None = None,
        *,
        groups: tuple[str, ...] | list[str] | None = None,
        partitions: int = 0,
        concurrency: int = 64,
        ack_wait: Duration = DEFAULT_ACK_WAIT,
        retry: RetryPolicy | None = None,
        max_iterations: int = 100,
        grace_period: Duration = 10.0,
        batch: int = 256,
        pull_expires: Duration = 5.0,
        worker_id: str | None = None,
        heartbeat_interval: Duration = 30.0,
    ) -> None:
        if nc is None:
            raise ConfigError("Worker needs a connected NATS client (nc is None)")
        if groups is not None:
            if isinstance(groups, str):
                raise ConfigError("groups must be a list of names, not a single string")
            groups = tuple(groups)
            if not groups:
                raise ConfigError("groups must name at least one group (omit it for all groups)")
            for g in groups:
                n.validate_group(g)
            if len(set(groups)) != len(groups):
                raise ConfigError(f"groups has duplicates: {list(groups)}")
        if not isinstance(partitions, int) or isinstance(partitions, bool):
            raise ConfigError(f"partitions must be an int, got {partitions!r}")
        if not 0 <= partitions <= MAX_PARTITIONS:
            raise ConfigError(
                f"partitions must be between 0 and {MAX_PARTITIONS}, got {partitions}"
            )
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be an int >= 1, got {batch!r}")
        self.nc: NATS = nc
        try:
            self.js = nc.jetstream()
        except Exception as e:  # pragma: no cover - nats-py does not fail here today
            raise ConfigError(f"JetStream could not be initialised: {e}") from e
        self.telemetry = telemetry or Telemetry()
        self.groups: tuple[str, ...] = groups or ()
        self.partitions = partitions
        self.concurrency = concurrency
        self.ack_wait = seconds(ack_wait, name="ack_wait", minimum=0.5)
        self.retry = (retry or RetryPolicy()).validated()
        self.max_iterations = max_iterations
        self.grace_period = seconds(grace_period, name="grace_period")
        self.batch = min(batch, concurrency)
        self.pull_expires = seconds(pull_expires, name="pull_expires", minimum=0.1, maximum=60)
        self.worker_id = n.new_worker_id() if worker_id is None else n.validate_worker_id(worker_id)
        self.heartbeat_interval = seconds(
            heartbeat_interval, name="heartbeat_interval", minimum=0.05, maximum=30.0
        )
        # a member whose directory entry was not refreshed for this long is dead; never
        # more than the directory bucket's 60 s TTL, after which the entry is gone anyway
        self.liveness = min(60.0, 3 * self.heartbeat_interval)
        self.stats = WorkerStats()
        self.health = WorkerHealth()
        self.services = Services(nc)
        self.recorder = OutcomeRecorder(
            nc, self.worker_id, self.stats, self.telemetry, self.services
        )
        self.cancels = CancelWatcher(None, self._on_cancel)
        self._running_ctx: dict[str, set[tuple[TaskContext, asyncio.Task[Any] | None]]] = {}
        self._specs: dict[str, HandlerSpec] = {}
        self._runtimes: dict[str, HandlerRuntime] = {}
        self._state = "new"  # new -> running -> stopping -> stopped
        self._run_slots: asyncio.Semaphore | None = None
        self._directory: Directory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()

    # ---------------------------------------------------------- registration
    @overload
    def handle(self, task_type: str, fn: F, **options: Any) -> F: ...
    @overload
    def handle(self, task_type: str, fn: None = None, **options: Any) -> Callable[[F], F]: ...

    def handle(self, task_type: str, fn: F | None = None, **options: Any) -> F | Callable[[F], F]:
        """Register ``fn`` for ``task_type`` (also usable as ``@worker.handle("type")``).

        Options: ``ack_wait`` (seconds/timedelta), ``retry`` (:class:`RetryPolicy`),
        ``max_iterations`` (int), ``concurrency`` (int, most pulled at once).
        Raises ``ConfigError`` for a bad name or option or a duplicate type, and
        :class:`LifecycleError` after ``start()``.
        """
        if fn is None:

            def deco(f: F) -> F:
                self.handle(task_type, f, **options)
                return f

            n.validate_task_type(task_type)
            return deco
        self._register(task_type, fn, singleton=False, **options)
        return fn

    def handle_singleton(self, task_type: str, fn: F | None = None, **options: Any) -> Any:
        """Register a handler of which at most one execution runs at a time across all
        workers: a one-partition elastic consumer group for this type only (other
        handlers keep their mode). Usable as a decorator; options as :meth:`handle`."""
        if fn is None:
            n.validate_task_type(task_type)

            def deco(f: F) -> F:
                self._register(task_type, f, singleton=True, **options)
                return f

            return deco
        self._register(task_type, fn, singleton=True, **options)
        return fn

    def _register(
        self, task_type: str, fn: Callable[..., Any], *, singleton: bool, **options: Any
    ) -> None:
        if self._state != "new":
            raise LifecycleError(
                f"cannot register {task_type!r}: handlers must be registered before start()"
            )
        unknown = set(options) - {"ack_wait", "retry", "max_iterations", "concurrency"}
        if unknown:
            raise ConfigError(f"unknown handler option(s): {sorted(unknown)}")
        spec = make_spec(
            task_type,
            fn,
            ack_wait=options.get("ack_wait"),
            retry=options.get("retry"),
            max_iterations=options.get("max_iterations", self.max_iterations),
            default_ack_wait=self.ack_wait,
            default_retry=self.retry,
            singleton=singleton,
            concurrency=options.get("concurrency"),
        )
        if task_type in self._specs:
            raise ConfigError(f"a handler for {task_type!r} is already registered")
        self._specs[task_type] = spec

    @property
    def task_types(self) -> list[str]:
        return sorted(self._specs)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def in_flight(self) -> int:
        return sum(len(r.inflight) for r in self._runtimes.values())

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Create/bind consumers, bind optional buckets, register in the directory,
        start pulling. Raises ``ConfigError`` with no handlers, ``LifecycleError`` when
        called twice, ``NotProvisionedError`` when streams/buckets are missing."""
        if self._state != "new":
            raise LifecycleError(f"start() called on a worker that is {self._state}")
        if not self._specs:
            raise ConfigError("start() with no handlers registered: call handle() first")
        self._loop = asyncio.get_running_loop()
        self._run_slots = asyncio.Semaphore(self.concurrency)
        await require_stream(self.js, n.TASK_STREAM)
        await require_stream(self.js, n.HISTORY_STREAM)
        await require_stream(self.js, n.DEAD_LETTER_STREAM)
        await self.services.bind_optional()
        self.cancels = CancelWatcher(self.services.signals, self._on_cancel)
        await self.cancels.start()
        self._directory = Directory(
            self.nc, self.worker_id, self._describe, refresh_every=self.heartbeat_interval
        )
        await self._directory.start()
        self._state = "running"
        try:
            for spec in self._specs.values():
                rt = self._runtime_for(spec)
                self._runtimes[spec.task_type] = rt
                await rt.start()
        except BaseException:
            await self.stop()
            raise

    def _runtime_for(self, spec: HandlerSpec) -> HandlerRuntime:
        if spec.singleton:
            return PartitionedRuntime(self, spec, 1)
        if self.partitions:
            return PartitionedRuntime(self, spec, self.partitions)
        return HandlerRuntime(self, spec)

    def _describe(self) -> dict[str, Any]:
        held: dict[str, object] = {}
        for rt in self._runtimes.values():
            held.update(rt.describe())
        return {
            "task_types": self.task_types,
            "groups": list(self.groups),
            "partitions": held,
        }

    async def _refresh_directory(self) -> None:
        if self._directory is not None:
            await self._directory.refresh()

    async def stop(self, grace_period: Duration | None = None) -> None:
        """Stop fetching, let in-flight tasks finish within the grace period (while
        heartbeating), nak what is left, deregister. Idempotent; safe before start."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            self._stopped.set()
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        self._state = "stopping"
        grace = (
            self.grace_period
            if grace_period is None
            else seconds(grace_period, name="grace_period", allow_zero=True)
        )
        runtimes = list(self._runtimes.values())
        await asyncio.gather(*(rt.stop_pulling() for rt in runtimes))
        pending = [t for rt in runtimes for t in rt.inflight]
        if pending:
            # grace 0 means none: asyncio.wait(timeout=0) returns at once
            _, still = await asyncio.wait(pending, timeout=grace)
            if still:
                for rt in runtimes:
                    for t in list(rt.inflight):
                        if t in still:
                            t.cancel()
                await asyncio.wait(still, timeout=5)
        for rt in runtimes:
            await rt.stop()
        await self.cancels.stop()
        if self._directory is not None:
            await self._directory.stop()
        self._state = "stopped"
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -------------------------------------------------------------- execution
    async def _execute(self, rt: HandlerRuntime, msg: Msg) -> None:
        spec = rt.spec
        try:
            meta = msg.metadata
            attempt = meta.num_delivered
            seq = meta.sequence.stream
        except Exception:  # not a JetStream message; nothing to ack
            log.error("message without JetStream metadata on %s", msg.subject)
            return
        try:
            payload = w.TaskPayload.decode(msg.data)
        except PayloadError as e:
            await self.recorder.dead_invalid(spec, msg, str(e), attempt, seq)
            return
        subject = rt.task_subject(msg)
        tokens = subject.split(".")
        group = tokens[2] if len(tokens) >= 4 else None
        info = TaskInfo(
            task_type=spec.task_type,
            task_id=payload.task_id,
            run_id=payload.run_id,
            step_id=payload.step_id,
            attempt=attempt,
            iteration=payload.iteration,
            metadata=payload.metadata,
            group=group,
            subject=subject,
            stream_sequence=seq,
        )
        assert self._run_slots is not None
        async with self._run_slots:
            if self._state != "running":
                # pulled but never started before stop: hand it back at once
                self.stats.nacked_on_stop += 1
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            await self._run(rt, spec, info, payload, msg)

    async def _run(
        self,
        rt: HandlerRuntime,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
    ) -> None:
        reason = self.cancels.reason(info.run_id)
        if reason is not None:
            # cancelled while queued: never started
            await self.recorder.apply(
                spec, info, payload, msg, Outcome("cancelled", error=reason), checkpointed=True
            )
            return
        self.stats.started += 1
        await self.recorder.event(
            info,
            payload,
            w.STEP_STARTED,
            attempt_suffix(info),
            {
                "task_type": spec.task_type,
                "task_id": payload.task_id,
                "iteration": payload.iteration,
                "group": info.group,
            },
            wait=False,
        )
        assert self._loop is not None
        ctx = TaskContext(info, payload, msg, self.services, self._loop)
        entry = (ctx, asyncio.current_task() if spec.is_async else None)
        self._running_ctx.setdefault(info.run_id, set()).add(entry)
        t0 = time.monotonic()
        try:
            with self.telemetry.task_span(
                spec.task_type, info.run_id, info.step_id, payload.traceparent, payload.tracestate
            ):
                outcome = await self._call(spec, ctx)
        except asyncio.CancelledError:
            if ctx.cancelled and self._state == "running":
                # cancelled by a user, not by stop(): record it; the task goes on
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                outcome = Outcome("cancelled", error=ctx._cancel_reason)
            elif self._state == "stopping":
                # grace period over: hand the task back at once instead of AckWait
                self.stats.nacked_on_stop += 1
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            else:
                raise
        finally:
            runs = self._running_ctx.get(info.run_id)
            if runs is not None:
                runs.discard(entry)
                if not runs:
                    del self._running_ctx[info.run_id]
        if ctx.cancelled and ctx.outcome is None and outcome.kind != "cancelled":
            outcome = Outcome("cancelled", error=ctx._cancel_reason)
        self.telemetry.record_duration(time.monotonic() - t0, spec.task_type)
        if (
            rt.ordered
            and outcome.kind in ("fail", "retry_after")
            and not spec.retry.exhausted(info.attempt)
            and self._state == "running"
        ):
            # Ordered handlers retry in place: the key's later tasks wait behind this one
            # (a nak would let them overtake it). The lease is renewed while waiting.
            try:
                delay = await self.recorder.record_retry(spec, info, payload, outcome)
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.stats.nacked_on_stop += 1
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            if self._state != "running":
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            await self._run(rt, spec, replace(info, attempt=info.attempt + 1), payload, msg)
            return
        try:
            await self.recorder.apply(
                spec,
                info,
                payload,
                msg,
                outcome,
                chunks=ctx.chunks_sent,
                checkpointed=ctx._checkpointed,
            )
        except Exception as e:
            # Could not record the outcome (server gone?): do not ack; the task is
            # redelivered after AckWait and the outcome recorded then (dedup ids).
            log.error("recording outcome of %s/%s failed: %s", info.run_id, info.step_id, e)

    def _on_cancel(self, run_id: str, reason: str) -> None:
        for ctx, task in list(self._running_ctx.get(run_id, ())):
            ctx._cancelled = True
            ctx._cancel_reason = reason
            if task is not None:
                task.cancel()

    async def _call(self, spec: HandlerSpec, ctx: TaskContext) -> Outcome:
        try:
            if spec.is_async:
                result = await spec.fn(ctx)
            else:
                result = await asyncio.to_thread(spec.fn, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if ctx.outcome is not None:
                log.warning(
                    "handler %s raised after setting outcome %s: %r",
                    spec.task_type,
                    ctx.outcome.kind,
                    e,
                )
                return ctx.outcome
            if isinstance(e, PermanentError):
                return Outcome("permanent", error=_errtext(e))
            if isinstance(e, TaskCancelledError):
                return Outcome("permanent", error=_errtext(e))
            if isinstance(e, RetryableError) and e.delay is not None:
                return Outcome("retry_after", error=_errtext(e), delay=clamp_retry_after(e.delay))
            log.debug("handler %s raised", spec.task_type, exc_info=True)
            return Outcome("fail", error=_errtext(e))
        if ctx.outcome is not None:
            return ctx.outcome
        try:
            return Outcome("complete", w.to_json_value(result, "handler return value"))
        except PayloadError as e:
            return Outcome("permanent", error=str(e))


def _errtext(e: BaseException) -> str:
    s = str(e)
    return f"{type(e).__name__}: {s}" if s else type(e).__name__
