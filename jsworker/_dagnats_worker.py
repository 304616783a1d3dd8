"""The worker side of DagNats mode (the contract is in :mod:`jsworker._dagnats`).

:class:`DagnatsExecutor` runs one engine-dispatched task: it decodes the engine's body,
skips a task whose run was cancelled, writes ``step.started`` (waiting for the stream's
acknowledgement: it arms the engine's step timeout), runs the handler, writes the one
event that reports what happened and acks. It never naks to retry, never publishes a
next iteration and never writes a dead letter: the engine does all three. It naks only
when the event could not be written, as DagNats's Go worker does.

:class:`RunWatcher` follows KV ``workflow_runs``: a run the engine marked ``cancelled``
stops its running handlers (``ctx.cancelled``; async handlers get ``CancelledError``),
and its queued tasks are acked without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from . import _dagnats as dn
from . import _names as n
from . import _wire as w
from ._aio import cancel_and_wait
from ._context import Outcome, TaskInfo
from ._errors import PayloadError
from ._executor import MAX_TRACEBACK, Executor
from ._handler import HandlerRuntime, HandlerSpec
from ._outcomes import UnrecordableError
from ._pubacks import ack as fast_ack

log = logging.getLogger("jsworker.dagnats")

#: how many runs' last known status the watcher keeps
MAX_REMEMBERED = 65_536
#: Go's worker naks with these delays when it cannot report (started / outcome)
NAK_STARTED = 1.0
NAK_OUTCOME = 5.0


class RunWatcher:
    """The status of runs, from KV ``workflow_runs`` (key ``run.{id}``).

    Updates are followed from the watcher's start on (the bucket keeps every run ever
    started, so its history is never read in full); a run not seen since then is looked
    up once with a KV get. Without the bucket nothing is ever cancelled (Go's worker
    does the same) and the worker says so at start."""

    def __init__(
        self,
        js: JetStreamContext,
        spawn: Callable[[str, Callable[[], Awaitable[None]]], asyncio.Task[None]],
        on_cancel: Callable[[str, str], None],
    ) -> None:
        self.js = js
        self.spawn = spawn
        self.on_cancel = on_cancel
        self.kv: Any = None
        #: run id -> cancelled?, most recent last
        self.known: OrderedDict[str, bool] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    @property
    def available(self) -> bool:
        return self.kv is not None

    async def start(self) -> None:
        try:
            self.kv = await self.js.key_value(dn.RUNS_BUCKET)
        except nats.js.errors.NotFoundError:
            log.warning(
                "KV bucket %s not found: cancelled runs are not detected "
                "(is the DagNats engine running on this server?)",
                dn.RUNS_BUCKET,
            )
            return
        self._sub = await self.js.subscribe(
            f"$KV.{dn.RUNS_BUCKET}.run.>",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )
        self._task = self.spawn("dagnats-runs", self._loop)

    async def _loop(self) -> None:
        assert self._sub is not None
        prefix = len(f"$KV.{dn.RUNS_BUCKET}.run.")
        async for msg in self._sub.messages:
            run_id = msg.subject[prefix:]
            op = (msg.headers or {}).get("KV-Operation")
            if op in ("DEL", "PURGE"):
                self.known.pop(run_id, None)
                continue
            cancelled = dn.run_status(msg.data) == "cancelled"
            self._remember(run_id, cancelled)
            if cancelled:
                self.on_cancel(run_id, "run cancelled")

    def _remember(self, run_id: str, cancelled: bool) -> None:
        self.known[run_id] = cancelled
        self.known.move_to_end(run_id)
        while len(self.known) > MAX_REMEMBERED:
            self.known.popitem(last=False)

    async def is_cancelled(self, run_id: str) -> bool:
        """True when the engine marked the run cancelled. Any failure to tell (no
        bucket, no entry, a timeout, an unreadable value) means not cancelled: running a
        task of a cancelled run is better than dropping one (Go's rule too)."""
        known = self.known.get(run_id)
        if known is not None:
            return known
        if self.kv is None:
            return False
        try:
            entry = await self.kv.get(dn.run_key(run_id))
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
            return False
        cancelled = dn.run_status(entry.value or b"") == "cancelled"
        self._remember(run_id, cancelled)
        return cancelled

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


class DagnatsExecutor(Executor):
    """Runs engine-dispatched tasks (see the module docstring)."""

    runs: RunWatcher

    async def execute(self, rt: HandlerRuntime, msg: Msg) -> None:
        try:
            meta = msg.metadata
            delivered = meta.num_delivered
            seq = meta.sequence.stream
        except Exception:  # not a JetStream message; nothing to ack
            log.error("message without JetStream metadata on %s", msg.subject)
            return
        if rt.draining.is_set():
            await self._hand_back(msg)
            return
        subject = rt.task_subject(msg)
        try:
            task = dn.decode_task(msg.data)
        except PayloadError as e:
            await self._invalid(rt, msg, str(e), delivered, seq)
            return
        payload = task.payload
        tokens = subject.split(".")
        info = TaskInfo(
            task_type=rt.task_type,
            task_id=payload.task_id,
            run_id=payload.run_id,
            step_id=payload.step_id,
            # the engine counts attempts; the delivery count stands in when it sent none
            attempt=task.attempt or delivered,
            iteration=payload.iteration,
            metadata=payload.metadata,
            group=tokens[2] if len(tokens) >= 4 and tokens[0] == "task" else None,
            subject=subject,
            stream_sequence=seq,
        )
        if await self.runs.is_cancelled(info.run_id):
            self.stats.cancelled += 1
            log.info("skipping %s/%s: its run was cancelled", info.run_id, info.step_id)
            await self._ack(msg)
            return
        pause = self.backoff.remaining()
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.draining.wait(), pause)
            if rt.draining.is_set():
                await self._hand_back(msg)
                return
        spec = rt.spec
        ran = await self._attempt(rt, spec, info, payload, msg)
        if ran is None:
            return
        outcome, _ctx, payload = ran
        await self._report(spec, info, payload, msg, outcome)

    async def _started(
        self, spec: HandlerSpec, info: TaskInfo, payload: w.TaskPayload, msg: Msg
    ) -> bool:
        """``step.started`` with the stream's acknowledgement awaited (the engine arms
        the step's timeout from it); when it cannot be written the task is nak'ed after
        1 s and the handler does not run."""
        try:
            await self._publish(w.STEP_STARTED, info, payload, None, has_payload=False)
        except Exception as e:
            log.error(
                "step.started of %s/%s not written (%s): nak, retried in %gs",
                info.run_id,
                info.step_id,
                e,
                NAK_STARTED,
            )
            self.backoff.failed()
            with contextlib.suppress(Exception):
                await msg.nak(delay=NAK_STARTED)
            return False
        return True

    async def _report(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
        outcome: Outcome,
    ) -> None:
        if outcome.kind == "cancelled":
            # the engine cancelled the run itself: there is nothing to report
            self.stats.cancelled += 1
            await self._ack(msg)
            return
        try:
            try:
                await self._publish_outcome(info, payload, outcome)
            except UnrecordableError as e:
                # an output too large for an event (or a subject the server refuses):
                # retrying runs into the same wall, so the engine is told it failed
                log.error(
                    "outcome of %s/%s cannot be written (%s): reported as non_retriable",
                    info.run_id,
                    info.step_id,
                    e,
                )
                doc = dn.failed_payload(f"outcome not recordable: {e}", dn.NON_RETRIABLE)
                await self._publish(w.STEP_FAILED, info, payload, doc)
                self.stats.dead += 1
        except Exception as e:
            self.backoff.failed()
            log.error(
                "outcome of %s/%s not written (%s): nak, redelivered in %gs",
                info.run_id,
                info.step_id,
                e,
                NAK_OUTCOME,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=NAK_OUTCOME)
            return
        self.backoff.succeeded()
        await self._ack(msg)

    async def _publish_outcome(
        self, info: TaskInfo, payload: w.TaskPayload, outcome: Outcome
    ) -> None:
        kind = outcome.kind
        if kind == "complete":
            await self._publish(
                w.STEP_COMPLETED,
                info,
                payload,
                outcome.output,
                has_payload=outcome.output is not None,
            )
            self.stats.completed += 1
        elif kind == "continue":
            await self._publish(w.STEP_CONTINUE, info, payload, outcome.output, continued=True)
            self.stats.continued += 1
        else:
            ftype = {"fail": dn.RETRIABLE, "retry_after": dn.RETRY_AFTER}.get(
                kind, dn.NON_RETRIABLE
            )
            doc = dn.failed_payload(outcome.error, ftype, outcome.delay)
            if outcome.traceback:
                doc["traceback"] = outcome.traceback[-MAX_TRACEBACK:]
            await self._publish(w.STEP_FAILED, info, payload, doc)
            if ftype == dn.NON_RETRIABLE:
                self.stats.dead += 1
            else:
                self.stats.failed += 1

    async def _publish(
        self,
        etype: str,
        info: TaskInfo,
        payload: w.TaskPayload,
        body: w.JSON,
        *,
        has_payload: bool = True,
        continued: bool = False,
    ) -> None:
        doc = dn.event_doc(
            etype,
            run_id=info.run_id,
            step_id=info.step_id,
            payload=body,
            worker_id=self.recorder.worker_id,
            attempt=info.attempt,
            trace_parent=payload.traceparent,
            trace_state=payload.tracestate,
            has_payload=has_payload,
        )
        msg_id = (
            dn.continue_msg_id(info.run_id, info.step_id, info.iteration)
            if continued
            else dn.event_msg_id(info.run_id, info.step_id, etype, info.attempt)
        )
        headers = {"Nats-Msg-Id": msg_id}
        # an error text is cut to fit; an output never is (UnrecordableError instead)
        data = self.recorder.encode(doc, (("payload", "error"), ("payload", "traceback")), headers)
        await self.recorder._publish(n.history_subject(info.run_id), data, headers)

    async def _invalid(
        self, rt: HandlerRuntime, msg: Msg, reason: str, delivered: int, seq: int
    ) -> None:
        """A body that cannot be served. With a usable run and step id the engine is
        told (``step.failed``, ``non_retriable``: the same bytes fail every time);
        without one nothing could reach it, so jsworker's invalid dead letter is the
        record (``dead.{type}.invalid.{seq}``)."""
        target = dn.addressable(msg.data)
        if target is None:
            await self.recorder.dead_invalid(rt.spec, msg, reason, delivered, seq)
            return
        run_id, step_id = target
        info = TaskInfo(
            task_type=rt.task_type,
            task_id=f"{run_id}.{step_id}",
            run_id=run_id,
            step_id=step_id,
            attempt=delivered,
            iteration=0,
            metadata={},
            group=None,
            subject=msg.subject,
            stream_sequence=seq,
        )
        log.error("task %s/%s refused: %s", run_id, step_id, reason)
        payload = w.TaskPayload(task_id=info.task_id, run_id=run_id, step_id=step_id)
        try:
            await self._publish(
                w.STEP_FAILED,
                info,
                payload,
                dn.failed_payload(f"invalid task payload: {reason}", dn.NON_RETRIABLE),
            )
        except Exception as e:
            log.error("step.failed of %s/%s not written (%s): nak", run_id, step_id, e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=NAK_OUTCOME)
            return
        self.stats.dead += 1
        await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        try:
            await fast_ack(msg)
        except Exception as e:  # redelivered; the engine ignores a second report
            log.warning("ack of %s failed: %s", msg.subject, e)
