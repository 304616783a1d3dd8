"""Recording outcomes on the wire: lifecycle events, acks/naks/terms, dead letters.

One place applies the outcome table (docs/task-outcomes.md; the records are specified in
docs/wire.md), so every path (handler result, raised exception, invalid payload,
cancellation) produces the same wire effects.

No execution loops forever. A publish fails either for a reason that repeats on every
attempt (an invalid subject, a message over ``max_payload``, a value that cannot be
encoded: :func:`is_permanent`) or for one that may pass (a timeout, no responders, a
lost connection, a leader election). Permanent reasons are never retried:

* an event or dead letter that is too large is shrunk to fit (:func:`_wire.shrink_to_fit`:
  a prefix of the input, output or error, with its size, sha256 and a ``_truncated``
  flag) — unless the large part *is* the outcome (a ``step.completed`` output, a
  ``continue_`` output that would become the next iteration's input): then the outcome is
  replaced by a terminal failure of kind ``unrecordable`` whose dead letter keeps the
  truncated output;
* a record that cannot be published at all falls back to the task's dead letter, and
  that to ``dead.{type}.invalid.{seq}``, which every task has.

A transient failure leaves the task unacknowledged for redelivery (``apply`` raises, and
only then), but from the :meth:`OutcomeRecorder.delivery_limit`-th delivery on it is
dead-lettered as ``unrecordable`` instead. A task is acked, nak'ed or terminated only
after its outcome (or its dead letter) is stored.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from . import _names as n
from . import _wire as w
from ._context import Outcome, TaskInfo
from ._dagnats import failure_type_of
from ._dead import REPLAYED_FROM
from ._errors import JSWorkerError, PayloadError
from ._handler import HandlerSpec
from ._pubacks import PubAcks
from ._pubacks import ack as fast_ack
from ._pubacks import publish as fast_publish
from ._stats import WorkerStats

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from ._services import Services
    from ._telemetry import Telemetry

log = logging.getLogger("jsworker.outcomes")

#: deliveries from which a transient recording failure dead-letters the task (or the
#: handler's retry budget, when that is larger)
RECORD_DELIVERY_LIMIT = 20
#: longest subject published, in bytes; the server's control line (subject, reply inbox,
#: sizes) is limited to 4096 bytes and it drops a connection that exceeds it
MAX_SUBJECT_BYTES = 2048
#: JetStream API error: "message size exceeds maximum allowed" (a stream's max_msg_size)
_JS_MSG_TOO_LARGE = 10054


#: bytes of ``{"Nats-Msg-Id": ""}`` as a header block (``NATS/1.0``, the key, CRLFs)
_ID_HEADER_SIZE = w.headers_size({"Nats-Msg-Id": ""})


class UnrecordableError(JSWorkerError):
    """A record that can never be published as it is: the same attempt would fail the
    same way (invalid subject, over ``max_payload``, not encodable)."""


_PERMANENT: tuple[type[BaseException], ...] = (
    UnrecordableError,
    PayloadError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
    nats.errors.MaxPayloadError,
)


def is_permanent(e: BaseException) -> bool:
    """True when a failed publish would fail the same way on every retry."""
    if isinstance(e, _PERMANENT):
        return True
    if isinstance(e, nats.js.errors.APIError):
        return e.err_code == _JS_MSG_TOO_LARGE
    if isinstance(e, nats.errors.Error):
        return False  # timeouts, no responders, connection state: may pass
    # encoding: orjson's TypeError, surrogates' UnicodeEncodeError (a ValueError)
    return isinstance(e, TypeError | ValueError)


#: non-empty tokens without whitespace (``\s`` is exactly ``str.isspace``) or wildcards
_VALID_SUBJECT = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")


def check_subject(subject: str) -> None:
    """Raise :class:`UnrecordableError` for a subject the server would refuse or
    misread: empty tokens, whitespace, wildcard tokens, or over
    :data:`MAX_SUBJECT_BYTES`. (Published as is, a wildcard is stored under the literal
    subject, and an oversized one makes the server drop the connection.)"""
    size = len(subject.encode())
    if size > MAX_SUBJECT_BYTES:
        raise UnrecordableError(f"subject is {size} bytes, over {MAX_SUBJECT_BYTES}")
    if _VALID_SUBJECT.fullmatch(subject) is None:
        raise UnrecordableError(f"invalid subject {subject[:200]!r}")


def attempt_suffix(info: TaskInfo) -> str:
    """Dedup suffix of per-attempt events: ``{attempt}``, or ``i{iteration}.{attempt}``
    after the first iteration so iterations never collide."""
    return str(info.attempt) if info.iteration == 0 else f"i{info.iteration}.{info.attempt}"


def _traceback(o: Outcome) -> dict[str, str]:
    """``{"traceback": ...}`` for a handler that raised, else nothing (docs/wire.md)."""
    return {"traceback": o.traceback} if o.traceback else {}


def replay_tag(metadata: Mapping[str, str]) -> str:
    """``.r{seq}`` for a task re-submitted from dead letter ``seq`` (its metadata
    ``replayed_from``, docs/dead-letters.md), else ``""``.

    Appended to the dedup ids of everything the task records (events, its dead letter,
    its next iteration), so a replay is not dropped as a duplicate of the run's earlier
    records within the streams' duplicate windows, while a redelivery of the replay
    still records once. A value that does not parse is ignored (no tag)."""
    raw = metadata.get(REPLAYED_FROM)
    if not raw:
        return ""
    try:
        link = json.loads(raw)
    except ValueError:
        return ""
    seq = link.get("seq") if isinstance(link, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return f".r{seq}"
    return ""


def dead_msg_id(info: TaskInfo) -> str:
    return f"{info.run_id}.{info.step_id}.{info.iteration}.dead{replay_tag(info.metadata)}"


#: fields of an event payload that may be truncated to make the event fit
_EVENT_SHRINK = (("payload", "traceback"), ("payload", "error"), ("payload", "reason"))
#: fields of a dead letter that may be truncated (the large ones first in practice)
_DEAD_SHRINK = (
    ("traceback",),
    ("task", "input"),
    ("output",),
    ("task", "metadata"),
    ("error",),
    ("subject",),
)


class OutcomeRecorder:
    """Writes outcomes for one worker. It gets exactly what it needs, never the worker.

    ``record_delivery_limit``: see :meth:`delivery_limit` (default 20).
    """

    def __init__(
        self,
        nc: NATS,
        worker_id: str,
        stats: WorkerStats,
        telemetry: Telemetry,
        services: Services,
        *,
        record_delivery_limit: int = RECORD_DELIVERY_LIMIT,
        publish_timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.worker_id = worker_id
        self.stats = stats
        self.telemetry = telemetry
        self.services = services
        self.record_delivery_limit = record_delivery_limit
        #: pipelined JetStream publishes: no request round trip per record
        self.pubacks = PubAcks(nc, timeout=publish_timeout)

    async def close(self) -> None:
        """Drop the PubAck subscription (the worker calls this when it stops)."""
        await self.pubacks.close()

    def delivery_limit(self, spec: HandlerSpec) -> int:
        """From this delivery on, an outcome that fails to record for a transient reason
        is dead-lettered (``unrecordable``) instead of left for redelivery:
        ``record_delivery_limit``, or the handler's ``max_attempts`` when larger."""
        return max(self.record_delivery_limit, spec.retry.max_attempts)

    # ------------------------------------------------------------ publishing
    def room(self, headers: Mapping[str, str] | None) -> int:
        """Bytes a message body may have next to ``headers`` (0: no known limit)."""
        limit = self.nc.max_payload
        if not limit:
            return 0
        if headers is not None and len(headers) == 1:
            # the common case, a dedup id alone: w.headers_size without the loop
            msg_id = headers.get("Nats-Msg-Id")
            if msg_id is not None and msg_id == msg_id.strip():
                return max(0, limit - _ID_HEADER_SIZE - len(msg_id.encode()))
        return max(0, limit - w.headers_size(headers))

    def fits(self, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Raise :class:`UnrecordableError` if the message can never be published."""
        check_subject(subject)
        room = self.room(headers)
        if room and len(data) > room:
            raise UnrecordableError(
                f"{subject.split('.')[0]} message of {len(data)} bytes plus "
                f"{w.headers_size(headers)} bytes of headers is over the server's "
                f"max_payload of {self.nc.max_payload} bytes"
            )

    def encode(
        self, doc: dict[str, Any], paths: Sequence[Sequence[str]], headers: Mapping[str, str]
    ) -> bytes:
        """``doc`` as JSON, shrunk to fit (:func:`_wire.shrink_to_fit`) when needed."""
        room = self.room(headers)
        what = doc.get("type") or "dead letter"
        try:
            return w.shrink_to_fit(doc, paths, room) if room else w.dumps(doc)
        except PayloadError as e:
            raise UnrecordableError(
                f"the {what} {e} (the server's max_payload of {self.nc.max_payload} bytes "
                f"less {w.headers_size(headers)} bytes of headers)"
            ) from e
        except (TypeError, ValueError) as e:
            raise UnrecordableError(f"the {what} cannot be encoded as JSON: {e}") from e

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """JetStream publish; permanent failures become :class:`UnrecordableError`,
        transient ones propagate as they are."""
        self.fits(subject, data, headers)
        try:
            await (await self.pubacks.publish(subject, data, headers))
        except Exception as e:
            if is_permanent(e):
                raise UnrecordableError(f"{type(e).__name__}: {e}") from e
            raise

    async def _settle(self, what: str, op: Callable[[], Awaitable[None]]) -> None:
        """ack/nak/term after the outcome is stored. A failure here is logged, not
        raised: the task is redelivered and its outcome, already stored, deduplicated."""
        try:
            await op()
        except Exception as e:
            log.warning("%s failed after the outcome was recorded: %s", what, e)

    # --------------------------------------------------------------- outcomes
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
        """Apply one outcome: event(s) first, then ack/nak/term.

        Raises only when the outcome could not be recorded for a transient reason and
        the task is deliberately left unacknowledged, to be redelivered (event ids
        deduplicate); from :meth:`delivery_limit` deliveries on it is dead-lettered
        instead. An outcome that can never be recorded ends as ``unrecordable``."""
        try:
            await self._apply(spec, info, payload, msg, o, chunks, checkpointed)
        except UnrecordableError as e:
            await self._unrecordable(spec, info, payload, msg, o, str(e), checkpointed)
        except Exception as e:
            limit = self.delivery_limit(spec)
            if info.attempt < limit:
                raise
            reason = (
                f"the {o.kind!r} outcome could not be recorded by delivery {info.attempt} "
                f"(limit {limit}): {type(e).__name__}: {e}"
            )
            log.error("%s/%s: %s; dead-lettering it", info.run_id, info.step_id, reason)
            await self._unrecordable(
                spec, info, payload, msg, o, reason, checkpointed, event_required=False
            )

    async def _apply(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
        o: Outcome,
        chunks: int,
        checkpointed: bool,
    ) -> None:
        base: dict[str, Any] = {
            "task_type": spec.task_type,
            "task_id": info.task_id,
            "iteration": info.iteration,
        }
        if chunks:
            base["chunks"] = chunks
        if o.kind == "cancelled":
            await self.event(info, payload, w.STEP_CANCELLED, None, {**base, "reason": o.error})
            await self._settle("term", msg.term)
            self.stats.cancelled += 1
            if checkpointed:
                await self.services.clear_checkpoint(info.run_id, info.step_id)
            return
        if o.kind == "complete":
            # the output is the outcome: never truncated here (see _unrecordable)
            await self.event(info, payload, w.STEP_COMPLETED, None, {**base, "output": o.output})
            await self._settle("ack", lambda: fast_ack(msg))
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
            # The successor must fit before anything is recorded: its input is this
            # iteration's output, and a step.continue without a successor would strand it.
            body = replace(payload, iteration=nxt, attempt=1, input=o.output).encode()
            headers = {
                "Nats-Msg-Id": f"{info.run_id}.{info.step_id}.{nxt}{replay_tag(info.metadata)}"
            }
            self.fits(info.subject, body, headers)
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
            await self._publish(info.subject, body, headers)
            await self._settle("ack", lambda: fast_ack(msg))
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
        await self._settle("nak", lambda: msg.nak(delay=delay))

    async def _unrecordable(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        msg: Msg,
        o: Outcome,
        reason: str,
        checkpointed: bool,
        *,
        event_required: bool = True,
    ) -> None:
        """End a task whose outcome cannot be recorded as a terminal ``unrecordable``
        failure, keeping the (truncated) output in its dead letter."""
        log.error(
            "outcome %r of %s/%s cannot be recorded: %s", o.kind, info.run_id, info.step_id, reason
        )
        error = f"outcome {o.kind!r} could not be recorded: {reason}"
        if o.error:
            error += f"; the handler's error was: {o.error}"
        extra = {"output": o.output} if o.kind in ("complete", "continue") else None
        failed = Outcome("permanent", error=error)
        try:
            await self.terminal(
                checkpointed,
                spec,
                info,
                payload,
                msg,
                failed,
                w.UNRECORDABLE,
                extra=extra,
                event_required=event_required,
            )
        except UnrecordableError as e:
            # not even the task's own dead letter: the one every task has
            await self.dead_invalid(
                spec,
                msg,
                f"{error}; its dead letter could not be recorded either: {e}",
                info.attempt,
                info.stream_sequence,
                kind=w.UNRECORDABLE,
            )

    async def record_retry(
        self,
        spec: HandlerSpec,
        info: TaskInfo,
        payload: w.TaskPayload,
        o: Outcome,
        base: dict[str, Any] | None = None,
    ) -> float:
        """Record a retriable ``step.failed`` and return the delay before the retry.
        Ordered (partitioned) handlers call this and retry in place, holding their key.

        A retriable failure is not the final outcome, so one that can never be recorded
        is logged and the retry goes ahead; transient failures raise."""
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
        try:
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
                    # DagNats's field names too, so its tooling reads these events
                    "failure_type": failure_type_of(kind),
                    **({"retry_after_ms": int(delay * 1000)} if kind == w.RETRY_AFTER else {}),
                    "attempt": info.attempt,
                    **_traceback(o),
                },
            )
        except UnrecordableError as e:
            log.error("retriable failure of %s/%s not recorded: %s", info.run_id, info.step_id, e)
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
        *,
        extra: dict[str, Any] | None = None,
        event_required: bool = True,
    ) -> None:
        """Dead letter, then the terminal ``step.failed``, then term.

        The dead letter is shrunk to fit. Once it is stored it is the record: an event
        that can never be published is logged and skipped, and with
        ``event_required=False`` (the delivery limit was reached) so is one that fails
        for a transient reason."""
        dead: dict[str, Any] = {
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
        if extra:
            dead.update(extra)
        headers = {"Nats-Msg-Id": dead_msg_id(info)}
        await self._publish(
            n.dead_subject(spec.task_type, info.run_id, info.step_id),
            self.encode(dead, _DEAD_SHRINK, headers),
            headers,
        )
        try:
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
                    "failure_type": failure_type_of(kind),
                    "attempt": info.attempt,
                    **_traceback(o),
                },
            )
        except Exception as e:
            if event_required and not isinstance(e, UnrecordableError):
                raise  # transient: redelivered; the dead letter is deduplicated then
            log.error(
                "terminal event of %s/%s not recorded (its dead letter is): %s",
                info.run_id,
                info.step_id,
                e,
            )
        await self._settle("term", msg.term)
        self.stats.dead += 1
        self.telemetry.count("dead_lettered", spec.task_type)
        if checkpointed:
            await self.services.clear_checkpoint(info.run_id, info.step_id)

    async def dead_invalid(
        self,
        spec: HandlerSpec,
        msg: Msg,
        reason: str,
        attempt: int,
        seq: int,
        *,
        kind: str = w.INVALID_PAYLOAD,
    ) -> None:
        """A body that is not a valid task is dead-lettered as it came (base64), never
        retried: retrying cannot make it parse. A body too large to fit base64-encoded
        keeps a prefix, with ``payload_truncated``, ``payload_size`` and
        ``payload_sha256`` of the whole body.

        Never raises. When even this record cannot be stored the task stays
        unacknowledged (logged) and is tried again on its redelivery."""
        raw = msg.data or b""
        dead: dict[str, Any] = {
            "task_type": spec.task_type,
            "kind": kind,
            "error": reason,
            "attempts": attempt,
            "worker_id": self.worker_id,
            "subject": msg.subject,
            "timestamp": w.now_rfc3339(),
            "stream_sequence": seq,
            "payload_b64": base64.b64encode(raw).decode(),
        }
        subject = f"dead.{spec.task_type}.invalid.{seq}"
        headers = {"Nats-Msg-Id": f"invalid.{spec.task_type}.{seq}"}
        try:
            data = self._fit_invalid(dead, raw, headers)
            await self._publish(subject, data, headers)
        except Exception as e:
            log.error("dead-lettering task seq %s failed: %s", seq, e)
            return  # not acked: redelivered and tried again later
        await self._settle("term", msg.term)
        self.stats.dead += 1
        log.warning("task seq %s on %s dead-lettered (%s): %s", seq, msg.subject, kind, reason)

    def _fit_invalid(self, dead: dict[str, Any], raw: bytes, headers: dict[str, str]) -> bytes:
        room = self.room(headers)
        data = w.dumps(dead)
        if not room or len(data) <= room:
            return data
        dead["payload_b64"] = ""
        dead["payload_truncated"] = True
        dead["payload_size"] = len(raw)
        dead["payload_sha256"] = w.sha256_hex(raw)
        skeleton = w.shrink_to_fit(dead, (("error",), ("subject",)), room)
        keep = max(0, (room - len(skeleton)) // 4 * 3)  # base64: 4 bytes per 3
        dead["payload_b64"] = base64.b64encode(raw[:keep]).decode()
        return w.dumps(dead)

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
        """Publish a lifecycle event on ``history.{run_id}`` with its dedup id; its
        ``error`` / ``reason`` are truncated to fit.

        With ``wait=False`` (``step.started``) it is a core publish: stored and
        deduplicated by the stream, but nobody waits for the server's acknowledgement.
        It is best-effort and never raises: a failure is logged and the task runs.
        With ``wait=True`` a permanent failure raises :class:`UnrecordableError` and a
        transient one propagates."""
        doc = w.event_doc(
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
        msg_id = w.event_msg_id(info.run_id, info.step_id, etype, suffix)
        headers = {"Nats-Msg-Id": msg_id + replay_tag(info.metadata)}
        if wait:
            await self._publish(subject, self.encode(doc, _EVENT_SHRINK, headers), headers)
            return
        try:
            data = self.encode(doc, _EVENT_SHRINK, headers)
            self.fits(subject, data, headers)
            await fast_publish(self.nc, subject, data, headers=headers)
        except Exception as e:
            log.warning("%s of %s/%s not published: %s", etype, info.run_id, info.step_id, e)
