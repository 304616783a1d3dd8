"""Recording outcomes on the wire: lifecycle events, acks/naks/terms, dead letters.

One place applies DESIGN.md's outcome table, so every path (handler result, raised
exception, invalid payload, cancellation) produces the same wire effects.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from . import _names as n
from . import _wire as w
from ._context import Outcome, TaskInfo
from ._handler import HandlerSpec
from ._stats import WorkerStats

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from ._services import Services
    from ._telemetry import Telemetry

log = logging.getLogger("jsworker.outcomes")


def attempt_suffix(info: TaskInfo) -> str:
    """Dedup suffix of per-attempt events: ``{attempt}``, or ``i{iteration}.{attempt}``
    after the first iteration so iterations never collide."""
    return str(info.attempt) if info.iteration == 0 else f"i{info.iteration}.{info.attempt}"


def _traceback(o: Outcome) -> dict[str, str]:
    """``{"traceback": ...}`` for a handler that raised, else nothing (docs/wire.md)."""
    return {"traceback": o.traceback} if o.traceback else {}


class OutcomeRecorder:
    """Writes outcomes for one worker. It gets exactly what it needs, never the worker."""

    def __init__(
        self,
        nc: NATS,
        worker_id: str,
        stats: WorkerStats,
        telemetry: Telemetry,
        services: Services,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.worker_id = worker_id
        self.stats = stats
        self.telemetry = telemetry
        self.services = services

    async def apply(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
        o: Outcome,
        *,
        chunks: int = 0,
        checkpointed: bool = False,
    ) -> None:
        """Apply one outcome: event(s) first, then ack/nak/term, so an outcome that could
        not be recorded leaves the task to be redelivered (event ids deduplicate)."""
        base: dict[str, Any] = {
            "task_type": spec.task_type,
            "task_id": info.task_id,
            "iteration": info.iteration,
        }
        if chunks:
            base["chunks"] = chunks
        if o.kind == "cancelled":
            await self.event(info, payload, w.STEP_CANCELLED, None, {**base, "reason": o.error})
            await msg.term()
            self.stats.cancelled += 1
            if checkpointed:
                await self.services.clear_checkpoint(info.run_id, info.step_id)
            return
        if o.kind == "complete":
            await self.event(info, payload, w.STEP_COMPLETED, None, {**base, "output": o.output})
            await msg.ack()
            self.stats.completed += 1
            self.telemetry.count("completed", spec.task_type)
            if checkpointed:
                await self.services.clear_checkpoint(info.run_id, info.step_id)
            return
        if o.kind == "continue":
            nxt = info.iteration + 1
            if nxt >= spec.max_iterations:
                o = Outcome("permanent", error=f"max_iterations ({spec.max_iterations}) reached")
                await self.terminal(checkpointed, spec, info, payload, msg, o, "max_iterations")
                return
            # The event first, then the successor: history stays in causal order (the
            # next iteration cannot start, let alone finish, before this one's
            # step.continue is stored). A crash in between re-runs this iteration, whose
            # event and successor are both deduplicated by id.
            await self.event(
                info,
                payload,
                w.STEP_CONTINUE,
                info.iteration,
                {**base, "output": o.output, "next_iteration": nxt},
            )
            body = replace(payload, iteration=nxt, attempt=1, input=o.output).encode()
            await self.js.publish(
                info.subject, body, headers={"Nats-Msg-Id": f"{info.run_id}.{info.step_id}.{nxt}"}
            )
            await msg.ack()
            self.stats.continued += 1
            self.telemetry.count("continued", spec.task_type)
            return
        if o.kind == "permanent":
            await self.terminal(checkpointed, spec, info, payload, msg, o, w.NON_RETRIABLE)
            return
        # retriable: fail / retry_after
        if spec.retry.exhausted(info.attempt):
            await self.terminal(checkpointed, spec, info, payload, msg, o, w.EXHAUSTED)
            return
        delay = await self.record_retry(spec, info, payload, o, base)
        await msg.nak(delay=delay)

    async def record_retry(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        o: Outcome,
        base: dict[str, Any] | None = None,
    ) -> float:
        """Record a retriable ``step.failed`` and return the delay before the retry.
        Ordered (partitioned) handlers call this and retry in place, holding their key."""
        if base is None:
            base = {
                "task_type": spec.task_type,
                "task_id": info.task_id,
                "iteration": info.iteration,
            }
        delay = (
            o.delay
            if o.kind == "retry_after" and o.delay is not None
            else (spec.retry.delay_for(info.attempt))
        )
        kind = w.RETRY_AFTER if o.kind == "retry_after" else w.RETRIABLE
        await self.event(
            info,
            payload,
            w.STEP_FAILED,
            attempt_suffix(info),
            {
                **base,
                "error": o.error,
                "kind": kind,
                "retry_in_ms": int(delay * 1000),
                "attempt": info.attempt,
                **_traceback(o),
            },
        )
        self.stats.failed += 1
        self.telemetry.count("retried", spec.task_type)
        return delay

    async def terminal(
        self,
        checkpointed: bool,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
        o: Outcome,
        kind: str,
    ) -> None:
        dead = {
            "task_type": spec.task_type,
            "kind": kind,
            "error": o.error,
            **_traceback(o),
            "attempts": info.attempt,
            "worker_id": self.worker_id,
            "subject": info.subject,
            "timestamp": w.now_rfc3339(),
            "task": {
                "task_id": payload.task_id,
                "run_id": payload.run_id,
                "step_id": payload.step_id,
                "iteration": payload.iteration,
                "input": payload.input,
                "metadata": payload.metadata,
            },
        }
        await self.js.publish(
            n.dead_subject(spec.task_type, info.run_id, info.step_id),
            w.dumps(dead),
            headers={"Nats-Msg-Id": f"{info.run_id}.{info.step_id}.{info.iteration}.dead"},
        )
        await self.event(
            info,
            payload,
            w.STEP_FAILED,
            None,
            {
                "task_type": spec.task_type,
                "task_id": info.task_id,
                "iteration": info.iteration,
                "error": o.error,
                "kind": kind,
                "attempt": info.attempt,
                **_traceback(o),
            },
        )
        await msg.term()
        self.stats.dead += 1
        self.telemetry.count("dead_lettered", spec.task_type)
        if checkpointed:
            await self.services.clear_checkpoint(info.run_id, info.step_id)

    async def dead_invalid(
        self, spec: HandlerSpec, msg: Msg, reason: str, attempt: int, seq: int
    ) -> None:
        """A body that is not a valid task is dead-lettered as it came (base64), never
        retried: retrying cannot make it parse."""
        dead = {
            "task_type": spec.task_type,
            "kind": w.INVALID_PAYLOAD,
            "error": reason,
            "attempts": attempt,
            "worker_id": self.worker_id,
            "subject": msg.subject,
            "timestamp": w.now_rfc3339(),
            "stream_sequence": seq,
            "payload_b64": base64.b64encode(msg.data).decode(),
        }
        try:
            await self.js.publish(
                f"dead.{spec.task_type}.invalid.{seq}",
                w.dumps(dead),
                headers={"Nats-Msg-Id": f"invalid.{spec.task_type}.{seq}"},
            )
        except Exception as e:
            log.error("dead-lettering invalid task seq %s failed: %s", seq, e)
            return  # not acked: redelivered and tried again later
        await msg.term()
        self.stats.dead += 1
        log.warning("task seq %s on %s dead-lettered: %s", seq, msg.subject, reason)

    async def event(
        self,
        info: TaskInfo,
        payload: w.TaskPayload,
        etype: str,
        suffix: int | str | None,
        body: dict[str, Any],
        *,
        wait: bool = True,
    ) -> None:
        """Publish a lifecycle event on ``history.{run_id}`` with its dedup id. With
        ``wait=False`` (``step.started``) it is a core publish: stored and deduplicated
        by the stream, but nobody waits for the server's acknowledgement."""
        data = w.encode_event(
            etype,
            run_id=info.run_id,
            step_id=info.step_id,
            payload=body,
            worker_id=self.worker_id,
            attempt=info.attempt,
            trace_parent=payload.traceparent,
            trace_state=payload.tracestate,
        )
        subject = n.history_subject(info.run_id)
        headers = {"Nats-Msg-Id": w.event_msg_id(info.run_id, info.step_id, etype, suffix)}
        if wait:
            await self.js.publish(subject, data, headers=headers)
        else:
            await self.nc.publish(subject, data, headers=headers)
