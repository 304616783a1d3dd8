"""The executor: runs one delivered task to its recorded outcome.

A task flows one way: a runtime's pull loop hands a message (with one credit) to
:meth:`Executor.execute`, which decodes it, runs the handler the runtime has *now*
(``rt.spec``, so a replaced handler's next task runs the new code), maps what the handler
did to an :class:`Outcome` (:func:`outcome_of`), and has the :class:`OutcomeRecorder` put it
on the wire. The executor also keeps the registry of running task contexts, which
cancellation uses.

Ordered runtimes (partitioned, singleton) retry a failed task in place, in a loop: a nak
would let the key's later tasks overtake it. The lease is renewed by the runtime's
heartbeat while the retry waits, and a drain (stop, removal) ends the wait at once and
hands the task back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nats.aio.msg import Msg

from . import _wire as w
from ._context import Outcome, TaskCancelledError, TaskContext, TaskInfo
from ._errors import PayloadError, PermanentError, RetryableError
from ._gate import Admission, Gate
from ._handler import HandlerRuntime, HandlerSpec
from ._outcomes import OutcomeRecorder, attempt_suffix
from ._retry import clamp_retry_after
from ._services import Services
from ._stats import WorkerStats
from ._telemetry import Telemetry

log = logging.getLogger("jsworker.executor")

#: the traceback kept in a ``step.failed`` event is cut to its last this many characters
MAX_TRACEBACK = 8192


class RecordingBackoff:
    """Holds back new task starts while outcomes cannot be recorded.

    During a transient recording failure (the history stream's leader being elected,
    a server restarting) every task the worker starts runs to an outcome it cannot
    store, and runs again after AckWait: a handler with side effects would do its work
    twice, for every task pulled meanwhile. So after a failure, tasks about to start
    wait first: 0.25 s, doubling with each further failure up to 5 s; the next recorded
    outcome resets it. The wait is bounded, so the recorder's delivery limit still ends
    a task that can never be recorded, and a drain ends it at once."""

    FIRST = 0.25
    MAX = 5.0

    def __init__(self) -> None:
        self.pause = 0.0
        self.until = 0.0
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        self.pause = min(self.MAX, max(self.FIRST, self.pause * 2))
        self.until = time.monotonic() + self.pause

    def succeeded(self) -> None:
        self.pause = 0.0
        self.until = 0.0

    def remaining(self) -> float:
        return self.until - time.monotonic() if self.until else 0.0


class Executor:
    def __init__(
        self,
        recorder: OutcomeRecorder,
        services: Services,
        stats: WorkerStats,
        telemetry: Telemetry,
        is_cancelled: Callable[[str], str | None],
        gate: Gate | None = None,
    ) -> None:
        self.recorder = recorder
        self.services = services
        self.stats = stats
        self.telemetry = telemetry
        #: ``is_cancelled(run_id) -> reason | None`` (the cancel watcher's records)
        self.is_cancelled = is_cancelled
        #: sticky binding and rate limits, before the handler runs (``_gate.py``)
        self.gate = gate
        #: holds back task starts while outcomes cannot be recorded
        self.backoff = RecordingBackoff()
        self._running: dict[str, set[tuple[TaskContext, asyncio.Task[Any] | None]]] = {}
        #: executions running per (task type, handler version)
        self.running_versions: dict[tuple[str, int], int] = {}
        self._versions_changed = asyncio.Event()

    # ------------------------------------------------------------ one task
    async def execute(self, rt: HandlerRuntime, msg: Msg) -> None:
        try:
            meta = msg.metadata
            attempt = meta.num_delivered
            seq = meta.sequence.stream
        except Exception:  # not a JetStream message; nothing to ack
            log.error("message without JetStream metadata on %s", msg.subject)
            return
        if rt.draining.is_set():
            # pulled but not started before the runtime began draining: hand it back
            await self._hand_back(msg)
            return
        subject = rt.task_subject(msg)
        try:
            # the subject too: its group and key tokens follow the client's rules
            payload = w.TaskPayload.decode(msg.data, subject)
        except PayloadError as e:
            await self.recorder.dead_invalid(rt.spec, msg, str(e), attempt, seq)
            return
        tokens = subject.split(".")
        info = TaskInfo(
            task_type=rt.task_type,
            task_id=payload.task_id,
            run_id=payload.run_id,
            step_id=payload.step_id,
            attempt=attempt,
            iteration=payload.iteration,
            metadata=payload.metadata,
            group=tokens[2] if len(tokens) >= 4 else None,
            subject=subject,
            stream_sequence=seq,
        )
        reason = self.is_cancelled(info.run_id)
        if reason is not None:
            # cancelled while queued: never started
            await self.recorder.apply(
                rt.spec, info, payload, msg, Outcome("cancelled", error=reason), checkpointed=True
            )
            return
        adm: Admission | None = None
        if self.gate is not None and self.gate.applies(rt, msg):
            adm = await self.gate.admit(rt, msg, info, payload.input)
            if adm is None:
                return  # deferred by a rate limit (nak'ed; the attempt is kept)
            info = adm.info
            if adm.failure is not None:
                await self._gate_failure(rt, info, payload, msg, adm)
                return
        pause = self.backoff.remaining()
        if pause > 0:
            # outcomes could not be recorded a moment ago: running this task now would
            # most likely only make work that runs again after AckWait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.draining.wait(), pause)
            if rt.draining.is_set():
                await self._hand_back(msg)
                return
        while True:
            spec = rt.spec  # the code as of now: a replacement applies from here
            ran = await self._attempt(rt, spec, info, payload, msg)
            if ran is None:
                return  # handed back
            outcome, ctx, payload = ran
            if not (
                rt.ordered
                and outcome.kind in ("fail", "retry_after")
                and not spec.retry.exhausted(info.attempt)
                and not rt.draining.is_set()
            ):
                break
            # Ordered handlers retry in place: the key's later tasks wait behind this one
            # (a nak would let them overtake it). The heartbeat keeps the lease meanwhile.
            try:
                delay = await self.recorder.record_retry(spec, info, payload, outcome)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rt.draining.wait(), delay)
            except asyncio.CancelledError:
                await self._hand_back(msg)
                raise
            except Exception as e:
                # the retry could not be recorded (transient): apply() below tries again
                # and leaves the task for redelivery, dead-lettered past the limit
                log.error("recording a retry of %s/%s failed: %s", info.run_id, info.step_id, e)
                break
            if rt.draining.is_set():
                await self._hand_back(msg)
                return
            info = replace(info, attempt=info.attempt + 1)
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
            if adm is not None and self.gate is not None:
                await self.gate.finished(spec, adm, outcome, msg)
            self.backoff.succeeded()
        except Exception as e:
            # apply() raises only when it left the task for redelivery on purpose: the
            # outcome could not be recorded for a transient reason (server gone?). The
            # task comes back after AckWait and is recorded then (dedup ids), or is
            # dead-lettered from the recorder's delivery limit on.
            self.backoff.failed()
            log.error(
                "recording outcome of %s/%s failed (delivery %d), left for redelivery: %s",
                info.run_id,
                info.step_id,
                info.attempt,
                e,
            )

    async def _gate_failure(
        self, rt: HandlerRuntime, info: TaskInfo, payload: w.TaskPayload, msg: Msg, adm: Admission
    ) -> None:
        """End a task the gate refused (a hard-sticky task whose worker is gone, a task
        without its rate-limit key) as a terminal failure of the gate's kind."""
        assert adm.failure is not None and self.gate is not None
        outcome, kind = adm.failure
        try:
            await self.recorder.terminal(False, rt.spec, info, payload, msg, outcome, kind)
            await self.gate.finished(rt.spec, adm, outcome, msg)
        except Exception as e:  # not settled: redelivered, and recorded then (dedup ids)
            log.error("recording %s of %s/%s failed: %s", kind, info.run_id, info.step_id, e)

    async def _attempt(
        self,
        rt: HandlerRuntime,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
    ) -> tuple[Outcome, TaskContext, w.TaskPayload] | None:
        """One call of the handler; ``None`` when the task was handed back instead. The
        payload returned is what a successor (``continue_``) is built from: with
        telemetry on, it carries this attempt's span as ``traceparent``."""
        self.stats.started += 1
        if not await self._started(spec, info, payload, msg):
            return None
        ctx = TaskContext(info, payload, msg, self.services, asyncio.get_running_loop())
        entry = (ctx, asyncio.current_task() if spec.is_async else None)
        self._running.setdefault(info.run_id, set()).add(entry)
        version = (spec.task_type, spec.version)
        self.running_versions[version] = self.running_versions.get(version, 0) + 1
        try:
            with self.telemetry.task_span(spec.task_type, info, payload, msg.subject) as obs:
                outcome = await call_handler(spec, ctx)
                if obs is not None:  # telemetry on: span attributes, retry event, metrics
                    payload = obs.finish(outcome, spec.retry, spec.max_iterations)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if ctx.cancelled and not rt.draining.is_set():
                # cancelled by a user, not by a drain: record it; the task goes on
                if task is not None:
                    task.uncancel()
                outcome = Outcome("cancelled", error=ctx._cancel_reason)
            elif rt.draining.is_set():
                # grace period over: hand the task back at once instead of after AckWait
                if task is not None:
                    task.uncancel()
                await self._hand_back(msg)
                return None
            else:
                raise
        finally:
            runs = self._running.get(info.run_id)
            if runs is not None:
                runs.discard(entry)
                if not runs:
                    del self._running[info.run_id]
            left = self.running_versions[version] - 1
            if left:
                self.running_versions[version] = left
            else:
                del self.running_versions[version]
                self._versions_changed.set()
        if ctx.cancelled and ctx.outcome is None and outcome.kind != "cancelled":
            outcome = Outcome("cancelled", error=ctx._cancel_reason)
        return outcome, ctx, payload

    async def _started(
        self, spec: HandlerSpec, info: TaskInfo, payload: w.TaskPayload, msg: Msg
    ) -> bool:
        """Write ``step.started`` before the handler runs; ``False`` when the task was
        handed back instead. Standalone: best effort, fire and forget."""
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
        return True

    async def _hand_back(self, msg: Msg) -> None:
        self.stats.nacked_on_stop += 1
        with contextlib.suppress(Exception):
            await msg.nak()

    # --------------------------------------------------------- cancellation
    def on_cancel(self, run_id: str, reason: str) -> None:
        """Ask the running executions of ``run_id`` to stop (the cancel watcher calls
        this)."""
        for ctx, task in list(self._running.get(run_id, ())):
            ctx._cancelled = True
            ctx._cancel_reason = reason
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------ versions
    async def wait_versions_gone(self, task_type: str, keep: int | None) -> None:
        """Wait until no execution of ``task_type`` runs code other than version
        ``keep`` (``None``: until none runs at all)."""
        while any(t == task_type and v != keep for t, v in self.running_versions):
            self._versions_changed.clear()
            await self._versions_changed.wait()


async def call_handler(spec: HandlerSpec, ctx: TaskContext) -> Outcome:
    """Call the handler once and map what it did to an outcome."""
    try:
        if spec.is_async:
            result = await spec.fn(ctx)
        else:
            result = await asyncio.to_thread(spec.fn, ctx)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        tb = traceback.format_exc()
        if ctx.outcome is None:
            # one line at WARNING; the traceback is in the step.failed event (and at DEBUG)
            log.warning(
                "handler %s raised %s (run %s, step %s, attempt %d)",
                spec.task_type,
                errtext(e),
                ctx.info.run_id,
                ctx.info.step_id,
                ctx.info.attempt,
            )
            log.debug("handler %s traceback:\n%s", spec.task_type, tb)
        return outcome_of(e, ctx.outcome, spec.task_type, tb)
    if ctx.outcome is not None:
        return ctx.outcome
    try:
        return Outcome("complete", w.to_json_value(result, "handler return value"))
    except PayloadError as e:
        return Outcome("permanent", error=str(e))


def outcome_of(
    e: Exception, set_outcome: Outcome | None, task_type: str = "", tb: str | None = None
) -> Outcome:
    """The outcome of a handler that raised ``e`` (pure: unit-tested without a server).

    * an outcome set before raising stands (the exception is logged);
    * :class:`PermanentError` and :class:`TaskCancelledError`: non-retriable;
    * :class:`RetryableError` with a ``delay``: retry after exactly that delay;
    * anything else: retriable, after the handler's retry policy delay.
    The traceback (its last ``MAX_TRACEBACK`` characters) goes into ``step.failed``."""
    if set_outcome is not None:
        log.warning(
            "handler %s raised after setting outcome %s: %r", task_type, set_outcome.kind, e
        )
        return set_outcome
    text = errtext(e)
    tb = tb[-MAX_TRACEBACK:] if tb else None
    if isinstance(e, PermanentError | TaskCancelledError):
        return Outcome("permanent", error=text, traceback=tb)
    if isinstance(e, RetryableError) and e.delay is not None:
        return Outcome("retry_after", error=text, delay=clamp_retry_after(e.delay), traceback=tb)
    return Outcome("fail", error=text, traceback=tb)


def errtext(e: BaseException) -> str:
    s = str(e)
    return f"{type(e).__name__}: {s}" if s else type(e).__name__
