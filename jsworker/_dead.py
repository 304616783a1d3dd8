"""Dead letters: reading, replaying and purging the ``DEAD_LETTERS`` stream.

Records are written by :mod:`jsworker._outcomes` (and by workers in other languages) on

* ``dead.{type}.{run}.{step}`` after a permanent failure or an exhausted retry budget:
  ``task_type, kind, error, attempts, worker_id, subject, timestamp`` and ``task``
  (``task_id, run_id, step_id, iteration, input, metadata``);
* ``dead.{type}.invalid.{seq}`` for a body that was not a valid task: the same header
  fields plus ``stream_sequence`` and ``payload_b64`` (the body as it came).

Nothing read here is trusted: a record that is not a JSON object is still listed (kind
``unreadable``) so nothing is hidden, and fields of the wrong type read as absent.

Replaying re-submits the original task through :class:`jsworker.Client`'s encoding, on
its original subject (type, group and partition key), with a fresh attempt budget.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _names as n
from . import _wire as w
from ._duration import Duration, seconds
from ._errors import ConfigError, InvalidNameError, JSWorkerError, NotProvisionedError

#: the ``kind`` of a record that is not a JSON object
UNREADABLE = "unreadable"
#: metadata key a replayed task carries (a JSON string: metadata values are strings)
REPLAYED_FROM = "replayed_from"

_FETCH_BATCH = 256
_FETCH_TIMEOUT = 5.0


class DeadLetterNotFound(JSWorkerError):
    """No dead letter with that stream sequence or run id."""


class ReplayError(JSWorkerError):
    """A dead letter that cannot be re-submitted (an invalid payload: it never was a
    task; or a record whose task fields are missing)."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of ``DEAD_LETTERS``.

    ``seq`` and ``subject`` are the record's own stream sequence and subject
    (``dead.…``); ``task_subject`` is the subject the task was consumed from, from
    which ``group`` is read. ``payload_text`` is set for ``invalid_payload`` records
    whose base64 body decodes to UTF-8 text. ``raw`` is the record as stored.
    """

    seq: int
    subject: str
    task_type: str
    run_id: str | None
    step_id: str | None
    kind: str
    error: str
    attempts: int
    worker_id: str | None
    timestamp: str
    input: Any
    metadata: dict[str, Any]
    traceback: str | None
    payload_text: str | None
    raw: dict[str, Any]
    task_subject: str | None = None
    group: str | None = None
    iteration: int = 0

    @property
    def replayable(self) -> bool:
        return (
            self.kind not in (w.INVALID_PAYLOAD, UNREADABLE)
            and bool(self.run_id and self.step_id)
            and not self.truncated
        )

    @property
    def truncated(self) -> bool:
        """The record's task input or metadata was truncated to fit ``max_payload``
        (``input_truncated``, docs/wire.md): the original cannot be re-submitted."""
        task = self.raw.get("task")
        return isinstance(task, dict) and any(
            task.get(f) is True for f in ("input_truncated", "metadata_truncated")
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (``jsworker dead ... --json``)."""
        return {
            "seq": self.seq,
            "subject": self.subject,
            "task_type": self.task_type,
            "group": self.group,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "iteration": self.iteration,
            "kind": self.kind,
            "error": self.error,
            "attempts": self.attempts,
            "worker_id": self.worker_id,
            "timestamp": self.timestamp,
            "task_subject": self.task_subject,
            "input": self.input,
            "metadata": self.metadata,
            "traceback": self.traceback,
            "payload_text": self.payload_text,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay_dead` did. ``duplicate``: the server had already seen this
    replay (one dead letter is re-submitted once). ``listening``: some consumer of a
    live worker serves the task's subject; when False the task waits in the queue."""

    dl: DeadLetter
    run_id: str
    duplicate: bool
    listening: bool
    subject: str = ""
    dry_run: bool = False


# ------------------------------------------------------------------------- parsing
def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _int(v: Any, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _group_of(task_subject: str | None, task_type: str) -> str | None:
    """``task.{type}.{group}.{key}`` -> group; ``task.{type}.{key}`` -> None."""
    if not task_subject:
        return None
    toks = task_subject.split(".")
    if len(toks) == 4 and toks[0] == "task" and toks[1] == task_type:
        return toks[2]
    return None


def parse_record(seq: int, subject: str, data: bytes, stored_at: str = "") -> DeadLetter:
    """A :class:`DeadLetter` from one stored message. Never raises on bad data."""
    toks = subject.split(".")
    subj_type = toks[1] if len(toks) > 1 else ""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        obj = e
    if not isinstance(obj, dict):
        text = data.decode("utf-8", "replace")
        return DeadLetter(
            seq=seq,
            subject=subject,
            task_type=subj_type,
            run_id=None,
            step_id=None,
            kind=UNREADABLE,
            error=f"record is not a JSON object: {text[:200]}",
            attempts=0,
            worker_id=None,
            timestamp=stored_at,
            input=None,
            metadata={},
            traceback=None,
            payload_text=None,
            raw={"data": text},
        )
    task_field = obj.get("task")
    task: dict[str, Any] = task_field if isinstance(task_field, dict) else {}
    task_type = _str(obj.get("task_type")) or subj_type
    kind = _str(obj.get("kind")) or "unknown"
    run_id = _str(task.get("run_id"))
    step_id = _str(task.get("step_id"))
    if run_id is None and len(toks) == 4 and toks[2] != "invalid":
        run_id, step_id = toks[2], step_id or toks[3]
    payload_text = None
    b64 = obj.get("payload_b64")
    if isinstance(b64, str):
        with contextlib.suppress(binascii.Error, ValueError, UnicodeDecodeError):
            payload_text = base64.b64decode(b64, validate=True).decode("utf-8")
    metadata = task.get("metadata")
    task_subject = _str(obj.get("subject"))
    tb = obj.get("traceback", task.get("traceback"))
    return DeadLetter(
        seq=seq,
        subject=subject,
        task_type=task_type,
        run_id=run_id,
        step_id=step_id,
        kind=kind,
        error=str(obj.get("error") or ""),
        attempts=_int(obj.get("attempts")),
        worker_id=_str(obj.get("worker_id")),
        timestamp=_str(obj.get("timestamp")) or stored_at,
        input=task.get("input"),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
        traceback=tb if isinstance(tb, str) and tb else None,
        payload_text=payload_text,
        raw=obj,
        task_subject=task_subject,
        group=_group_of(task_subject, task_type),
        iteration=_int(task.get("iteration")),
    )


def _stamp(msg: Msg) -> str:
    ts = msg.metadata.timestamp
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z") if ts else ""


# ------------------------------------------------------------------------- reading
def _not_provisioned() -> NotProvisionedError:
    return NotProvisionedError(
        f"stream {n.DEAD_LETTER_STREAM} does not exist: run `jsworker kv setup`"
    )


@contextlib.asynccontextmanager
async def _reader(
    nc: NATS, filt: str, start: float | None
) -> AsyncIterator[tuple[JetStreamContext.PullSubscription, int]]:
    """An ephemeral consumer of ``DEAD_LETTERS`` on ``filt`` from unix time ``start``
    (or the beginning) and the number of records it has to deliver; deleted on exit."""
    js = nc.jetstream()
    name = f"jsw-dead-{secrets.token_hex(6)}"
    cfg = ConsumerConfig(
        name=name,
        filter_subject=filt,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,  # a backstop: deleted on exit
        mem_storage=True,
        num_replicas=1,
        deliver_policy=DeliverPolicy.ALL,
    )
    if start is not None:
        cfg.deliver_policy = DeliverPolicy.BY_START_TIME
        cfg.opt_start_time = datetime.fromtimestamp(start, UTC)
    try:
        info = await js.add_consumer(n.DEAD_LETTER_STREAM, cfg)
    except nats.js.errors.NotFoundError:
        raise _not_provisioned() from None
    try:
        sub = await js.pull_subscribe_bind(durable=None, stream=n.DEAD_LETTER_STREAM, name=name)
        try:
            yield sub, int(info.num_pending or 0)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(n.DEAD_LETTER_STREAM, name)


async def _read(nc: NATS, filt: str, start: float | None) -> list[DeadLetter]:
    """Every record on ``filt`` (oldest first) stored at or after unix time ``start``."""
    out: list[DeadLetter] = []
    async with _reader(nc, filt, start) as (sub, remaining):
        while remaining > 0:
            try:
                msgs = await sub.fetch(min(remaining, _FETCH_BATCH), timeout=_FETCH_TIMEOUT)
            except nats.errors.TimeoutError:
                break  # purged meanwhile: what was read stands
            for msg in msgs:
                md = msg.metadata
                out.append(parse_record(md.sequence.stream, msg.subject, msg.data, _stamp(msg)))
                remaining = md.num_pending
    return out


async def list_dead(
    nc: NATS,
    *,
    task_type: str | None = None,
    since: Duration | None = None,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Dead letters, oldest first.

    ``task_type``: only that type. ``since``: only records stored in the last ``since``
    seconds (a float or a ``timedelta``). ``limit``: only the newest ``limit`` records
    (still oldest first). Raises ``NotProvisionedError`` without ``DEAD_LETTERS``.
    """
    filt = "dead.>" if task_type is None else f"dead.{n.validate_task_type(task_type)}.>"
    start = None
    if since is not None:
        start = time.time() - seconds(since, name="since")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    records = await _read(nc, filt, start)
    if limit is not None:
        return list(collections.deque(records, maxlen=limit))
    return records


async def get_dead(nc: NATS, ref: int | str) -> DeadLetter:
    """One dead letter by stream sequence (an int, or a string of digits) or by run id
    (the newest record of that run). Raises :class:`DeadLetterNotFound`."""
    if isinstance(ref, str) and ref.isdigit():
        ref = int(ref)
    if isinstance(ref, int) and not isinstance(ref, bool):
        if ref < 1:
            raise DeadLetterNotFound(f"no dead letter with sequence {ref}")
        js = nc.jetstream()
        try:
            raw = await js.get_msg(n.DEAD_LETTER_STREAM, ref)
        except nats.js.errors.NotFoundError as e:
            if getattr(e, "err_code", None) == 10059:
                raise _not_provisioned() from None
            raise DeadLetterNotFound(
                f"no dead letter with sequence {ref} in {n.DEAD_LETTER_STREAM} "
                "(`jsworker dead list` shows them)"
            ) from None
        subject = raw.subject or ""
        if not subject.startswith("dead."):
            raise DeadLetterNotFound(
                f"message {ref} of {n.DEAD_LETTER_STREAM} is not a dead letter"
            )
        stored = raw.time.isoformat().replace("+00:00", "Z") if raw.time else ""
        return parse_record(ref, subject, raw.data or b"", stored)
    try:
        run_id = n.validate_token(ref, "run id")
    except InvalidNameError as e:
        raise DeadLetterNotFound(
            f"{ref!r} is neither a sequence number nor a run id: {e}"
        ) from None
    found = await _read(nc, f"dead.*.{run_id}.*", None)
    if not found:
        raise DeadLetterNotFound(
            f"no dead letter for run {run_id} (`jsworker dead list` shows them)"
        )
    return found[-1]


# ------------------------------------------------------------------------ replaying
def _task_key(dl: DeadLetter) -> str | None:
    """The partition key the task was submitted with (its subject's last token), or
    None when that is the run id (the default)."""
    if not dl.task_subject:
        return None
    last = dl.task_subject.rsplit(".", 1)[-1]
    return None if last == dl.run_id else last


#: a consumer that delivered a task this recently (seconds) counts as served: its worker
#: may be busy with it, its pull request used up
RECENT_DELIVERY = 10.0


async def _listening(nc: NATS, task_subject: str, task_type: str, group: str | None) -> bool:
    """Does a live worker serve this subject? A consumer whose filter covers it with a
    waiting pull request (every idle worker keeps one open) or a delivery in the last
    :data:`RECENT_DELIVERY` seconds, or a live worker in the directory that lists the
    type (a busy one may have no pull waiting). A consumer alone (a durable left by a
    stopped worker) is not a worker."""
    from ._directory import list_workers
    from ._provision import _covers

    js = nc.jetstream()
    now = datetime.now(UTC)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        for ci in await js.consumers_info(n.TASK_STREAM):
            filters = [ci.config.filter_subject or "", *(ci.config.filter_subjects or [])]
            if not any(f and _covers(f, task_subject) for f in filters):
                continue
            if (ci.num_waiting or 0) > 0:
                return True
            last = ci.delivered.last_active if ci.delivered is not None else None
            if last is not None:
                if last.tzinfo is None:
                    last = last.replace(tzinfo=UTC)
                if (now - last).total_seconds() < RECENT_DELIVERY:
                    return True
    with contextlib.suppress(JSWorkerError, nats.errors.Error):
        for entry in await list_workers(nc):
            if task_type not in (entry.get("task_types") or []):
                continue
            groups = entry.get("groups") or []
            if group is None or not groups or group in groups:
                return True
    return False


async def replay_dead(nc: NATS, dl: DeadLetter, *, dry_run: bool = False) -> ReplayResult:
    """Re-submit the dead letter's task: same type, group, partition key, run, step,
    iteration and input, attempt 1 (a fresh retry budget), its metadata plus
    ``replayed_from`` (a JSON string ``{"stream", "seq", "subject"}``).

    The publish carries ``Nats-Msg-Id`` ``replay.{seq}``: replaying one dead letter twice
    within ``TASK_QUEUES``' duplicate window (10 min) submits it once
    (``duplicate=True``). ``dry_run`` builds and validates the task but publishes
    nothing. Raises :class:`ReplayError` for records that hold no task (invalid payloads).
    """
    from ._client import Client

    if not dl.replayable:
        raise ReplayError(
            f"dead letter {dl.seq} ({dl.kind}) holds no valid task to re-submit"
            + (": the body never parsed as a task" if dl.kind == w.INVALID_PAYLOAD else "")
            + (
                ": its input was truncated to fit the server's max_payload (the record keeps "
                "its size and sha256 only)"
                if dl.truncated
                else ""
            )
        )
    assert dl.run_id is not None and dl.step_id is not None
    client = Client(nc)
    metadata = {str(k): str(v) for k, v in dl.metadata.items()}
    metadata[REPLAYED_FROM] = json.dumps(
        {"stream": n.DEAD_LETTER_STREAM, "seq": dl.seq, "subject": dl.subject},
        separators=(",", ":"),
    )
    try:
        subject, body, run_id, _step, _task = client._build(
            dl.task_type,
            dl.input,
            group=dl.group,
            run_id=dl.run_id,
            step_id=dl.step_id,
            metadata=metadata,
            key=_task_key(dl),
        )
    except InvalidNameError as e:
        raise ReplayError(f"dead letter {dl.seq} cannot be replayed: {e}") from None
    if dl.iteration:
        body = replace(w.TaskPayload.decode(body), iteration=dl.iteration).encode()
    listening = await _listening(nc, subject, dl.task_type, dl.group)
    if dry_run:
        return ReplayResult(dl, run_id, False, listening, subject, True)
    ack = await client._publish(subject, body, f"replay.{dl.seq}")
    return ReplayResult(dl, run_id, bool(ack.duplicate), listening, subject)


# -------------------------------------------------------------------------- purging
async def purge_dead(nc: NATS, *, task_type: str, older_than: Duration) -> int:
    """Delete the dead letters of ``task_type`` stored more than ``older_than`` seconds
    ago (``0``: all of them); returns how many were deleted. A type is required: there
    is no "purge everything" here."""
    task_type = n.validate_task_type(task_type)
    age = seconds(older_than, name="older_than", allow_zero=True)
    js = nc.jetstream()
    filt = f"dead.{task_type}.>"
    try:
        si = await js.stream_info(n.DEAD_LETTER_STREAM)
    except nats.js.errors.NotFoundError:
        raise _not_provisioned() from None
    # Purge below the first record that is young enough to keep (or above everything
    # stored now, so a record arriving meanwhile is never purged unseen).
    upto = (si.state.last_seq or 0) + 1
    if age > 0:
        young = await _first_seq_since(nc, filt, time.time() - age)
        if young is not None:
            upto = min(upto, young)
    resp = await nc.request(
        f"$JS.API.STREAM.PURGE.{n.DEAD_LETTER_STREAM}",
        json.dumps({"filter": filt, "seq": upto}).encode(),
        timeout=10.0,
    )
    out = json.loads(resp.data)
    if "error" in out:
        raise JSWorkerError(
            f"purging {filt} failed: {out['error'].get('description', out['error'])}"
        )
    return int(out.get("purged", 0))


async def _first_seq_since(nc: NATS, filt: str, start: float) -> int | None:
    """Stream sequence of the first record on ``filt`` stored at or after ``start``."""
    async with _reader(nc, filt, start) as (sub, pending):
        if not pending:
            return None
        msgs = await sub.fetch(1, timeout=_FETCH_TIMEOUT)
        return int(msgs[0].metadata.sequence.stream)
