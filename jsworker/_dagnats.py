"""DagNats mode: the wire contract of the DagNats engine (github.com/danmestas/dagnats,
v0.0.12), as its Go worker follows it. Pure functions and constants only; the worker side
is :mod:`jsworker._dagnats_worker`.

In DagNats mode the engine owns the run: it dispatches each step as a task, and it alone
retries, continues agent loops, times steps out, rate-limits, routes sticky runs and
writes dead letters. The worker runs the handler and reports what happened with one
lifecycle event (``step.completed`` / ``step.failed`` / ``step.continue``) on
``history.{run_id}``, then acks the task. docs/dagnats.md is the user's page and
docs/wire.md has the table of differences from standalone mode.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _names as n
from . import _wire as w
from ._errors import ConfigError, InvalidNameError, PayloadError

STANDALONE = "standalone"
DAGNATS = "dagnats"
AUTO = "auto"
ENGINES = (STANDALONE, DAGNATS, AUTO)
#: the environment variable that picks the engine when no ``engine=`` is given
ENGINE_ENV = "JSWORKER_ENGINE"

#: DagNats's buckets and streams that standalone jsworker never creates: finding one
#: means the server is a DagNats deployment (``engine="auto"``)
RUNS_BUCKET = "workflow_runs"
MARKER_STREAM = "SLEEP_TIMERS"

#: the AckWait of DagNats's shared task consumers (``consumername.DefaultAckWait``)
DEFAULT_ACK_WAIT = 300.0
#: ``maxBufferedMessages`` of DagNats's elastic groups (``CreateElastic(..., 1024, 0)``)
MAX_BUFFERED_MSGS = 1024
#: ``FailRetryAfter`` clamps its delay to this range (milliseconds)
RETRY_AFTER_MS = (100, 3_600_000)

RETRIABLE = "retriable"
NON_RETRIABLE = "non_retriable"
RETRY_AFTER = "retry_after"

#: the longest step id accepted (DagNats sets none; this keeps subjects and KV keys sane)
MAX_STEP_ID = 256
MAX_TASK_ID = 512
_SEGMENT_BAD = re.compile(r"[*>\s/\\\x00-\x1f\x7f]")


def engine_setting(value: str | None) -> str:
    """The engine asked for: ``value``, else ``$JSWORKER_ENGINE``, else ``auto``.
    Raises ``ConfigError`` for anything but ``standalone``, ``dagnats`` or ``auto``."""
    source = "engine"
    if value is None:
        value = os.environ.get(ENGINE_ENV) or AUTO
        source = ENGINE_ENV
    if not isinstance(value, str) or value.strip().lower() not in ENGINES:
        raise ConfigError(f"{source} must be one of {', '.join(ENGINES)}, got {value!r}")
    return value.strip().lower()


# ------------------------------------------------------------------------ names
def sanitize(s: str) -> str:
    """A task type or group as a consumer-name fragment (DagNats's
    ``consumername.Sanitize``): ``[A-Za-z0-9_-]`` kept, ``.`` to ``-``, anything else to
    ``_``, byte by byte."""
    out = bytearray()
    for c in s.encode():
        if 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c in (45, 95):
            out.append(c)
        elif c == 46:
            out.append(45)
        else:
            out.append(95)
    return out.decode()


def consumer_name(task_type: str, group: str | None = None) -> str:
    """The durable shared with DagNats's Go workers and HTTP bridge:
    ``workers-{type}[-{group}]`` (sanitized)."""
    base = "workers-" + sanitize(task_type)
    return f"{base}-{sanitize(group)}" if group else base


def task_filter(task_type: str, group: str | None = None) -> str:
    """``task.{type}.>`` or ``task.{type}.{group}.>`` (not sanitized)."""
    return f"task.{task_type}.{group}.>" if group else f"task.{task_type}.>"


def group_name(task_type: str, group: str | None = None) -> str:
    """The elastic consumer group of a partitioned (or singleton) handler:
    ``workers-{type}[-{group}]``, *not* sanitized (DagNats's ``subscribeTask``)."""
    return f"workers-{task_type}-{group}" if group else f"workers-{task_type}"


def run_key(run_id: str) -> str:
    """The key of a run in KV ``workflow_runs``."""
    return f"run.{run_id}"


# ----------------------------------------------------------------------- bodies
def validate_step_id(value: object) -> str:
    """A DagNats step id is opaque but dotted (a map instance is ``{step}.map.{i}``): it
    becomes part of ``stream.{run}.{step}`` and of KV keys, so each dot-separated
    segment must be a subject token."""
    if not isinstance(value, str) or not value:
        raise InvalidNameError(f"step id must be a non-empty string, got {value!r}")
    if len(value) > MAX_STEP_ID:
        raise InvalidNameError(f"step id is {len(value)} characters, over {MAX_STEP_ID}")
    for seg in value.split("."):
        if not seg:
            raise InvalidNameError(f"step id {value!r} has an empty segment")
        bad = _SEGMENT_BAD.search(seg)
        if bad:
            raise InvalidNameError(f"step id {value!r} contains {bad.group()!r}")
    return value


@dataclass(frozen=True, slots=True)
class DagnatsTask:
    """A decoded ``protocol.TaskPayload`` (the engine's task body) and the jsworker
    payload built from it."""

    payload: w.TaskPayload
    #: the ``attempt`` field as sent (0: absent; the delivery count stands in)
    attempt: int
    workflow_name: str = ""
    dispatch_nonce: str = ""
    capabilities: tuple[str, ...] = field(default=())


def _str(obj: Mapping[str, Any], name: str) -> str:
    """A string field as Go decodes one: absent or null is ``""``, any other type an
    error (``json.Unmarshal`` refuses the whole body)."""
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PayloadError(f"task payload {name} must be a string, got {type(value).__name__}")
    return value


def _int(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= w.MAX_ITERATION:
        raise PayloadError(
            f"task payload {name} must be an integer between 0 and {w.MAX_ITERATION}, "
            f"got {str(value)[:40]}"
        )
    return value


def addressable(data: bytes) -> tuple[str, str] | None:
    """``(run_id, step_id)`` of a body that :func:`decode_task` refused, when both are
    still usable: the engine can then be told with a ``step.failed``."""
    try:
        obj = w.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    try:
        return n.validate_run_id(obj.get("run_id")), validate_step_id(obj.get("step_id"))
    except InvalidNameError:
        return None


def decode_task(data: bytes) -> DagnatsTask:
    """Parse and validate the engine's task body, with Go's JSON types: ``run_id`` (a
    token: it names ``history.{run_id}``) and ``step_id`` (dotted, see
    :func:`validate_step_id`) are required; ``task_id`` is opaque (default
    ``{run}.{step}``); ``iteration`` / ``attempt`` integers; ``metadata`` an object of
    strings; ``required_capabilities`` a list of strings. Raises :class:`PayloadError`."""
    try:
        obj = w.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"task payload is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise PayloadError(f"task payload must be a JSON object, got {type(obj).__name__}")
    try:
        run_id = n.validate_run_id(_str(obj, "run_id") or None)
        step_id = validate_step_id(_str(obj, "step_id") or None)
    except InvalidNameError as e:
        raise PayloadError(f"task payload: {e}") from None
    task_id = _str(obj, "task_id") or f"{run_id}.{step_id}"
    if len(task_id) > MAX_TASK_ID:
        raise PayloadError(f"task payload task_id is {len(task_id)} characters, over {MAX_TASK_ID}")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError("task payload metadata must be an object of strings")
    caps = obj.get("required_capabilities")
    if caps is None:
        caps = []
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise PayloadError("task payload required_capabilities must be a list of strings")
    attempt = _int(obj, "attempt")
    payload = w.TaskPayload(
        task_id=task_id,
        run_id=run_id,
        step_id=step_id,
        iteration=_int(obj, "iteration"),
        attempt=attempt or 1,
        input=obj.get("input"),
        metadata=dict(metadata),
        traceparent=w._trace_field(obj.get("traceparent")),
        tracestate=w._trace_field(obj.get("tracestate")),
    )
    return DagnatsTask(
        payload,
        attempt,
        workflow_name=_str(obj, "workflow_name"),
        dispatch_nonce=_str(obj, "dispatch_nonce"),
        capabilities=tuple(caps),
    )


# ----------------------------------------------------------------------- events
def event_doc(
    event_type: str,
    *,
    run_id: str,
    step_id: str,
    payload: w.JSON,
    worker_id: str,
    attempt: int,
    trace_parent: str = "",
    trace_state: str = "",
    has_payload: bool = True,
) -> dict[str, Any]:
    """A ``protocol.Event`` as Go marshals it: ``payload``, ``trace_parent``,
    ``trace_state``, ``worker_id`` and ``attempt_number`` are left out when empty."""
    doc: dict[str, Any] = {
        "type": event_type,
        "run_id": run_id,
        "step_id": step_id,
        "timestamp": w.now_rfc3339(),
    }
    if has_payload:
        doc["payload"] = payload
    if trace_parent:
        doc["trace_parent"] = trace_parent
    if trace_state:
        doc["trace_state"] = trace_state
    if worker_id:
        doc["worker_id"] = worker_id
    if attempt > 0:
        doc["attempt_number"] = attempt
    return doc


def event_msg_id(run_id: str, step_id: str, event_type: str, attempt: int) -> str:
    """``Event.NATSMsgID``: ``{run}.{step}.{type}``, plus ``.{attempt}`` when known."""
    base = f"{run_id}.{step_id}.{event_type}"
    return f"{base}.{attempt}" if attempt > 0 else base


def continue_msg_id(run_id: str, step_id: str, iteration: int) -> str:
    """``step.continue``'s id: ``{run}.{step}.continue.{iteration}.{nonce}``; the nonce
    (nanoseconds) keeps a re-dispatched iteration from being deduplicated away."""
    return f"{run_id}.{step_id}.continue.{iteration}.{time.time_ns()}"


def failed_payload(
    error: str, failure_type: str, retry_after: float | None = None
) -> dict[str, Any]:
    """``protocol.StepFailedPayload``: ``{error, failure_type[, retry_after_ms]}``; the
    delay is clamped to 100 ms - 1 h as Go's ``FailRetryAfter`` does."""
    doc: dict[str, Any] = {"error": error, "failure_type": failure_type}
    if failure_type == RETRY_AFTER:
        lo, hi = RETRY_AFTER_MS
        doc["retry_after_ms"] = min(hi, max(lo, round((retry_after or 0.0) * 1000)))
    return doc


def failure_type_of(kind: str) -> str:
    """The DagNats failure type of a jsworker failure kind (standalone events carry both,
    so DagNats tooling reads them as well)."""
    if kind == w.RETRIABLE:
        return RETRIABLE
    if kind == w.RETRY_AFTER:
        return RETRY_AFTER
    return NON_RETRIABLE


_STATUS = b'"status":'


def run_status(value: bytes) -> str | None:
    """The run's status in a ``workflow_runs`` value, read without decoding the whole
    record (it can hold every step's output). Go writes the fields in declaration order,
    ``run_id``, ``workflow_id``, ``status``, ...: the first ``"status":`` is the run's;
    one inside a string would be escaped (``\\"status\\":``). ``None`` when not found."""
    i = value.find(_STATUS)
    if i < 0:
        return None
    j = i + len(_STATUS)
    while j < len(value) and value[j] in b" \t\r\n":
        j += 1
    if j >= len(value) or value[j] != 34:  # '"'
        return None
    end = value.find(b'"', j + 1)
    if end < 0:
        return None
    return value[j + 1 : end].decode(errors="replace")


# --------------------------------------------------------------------- contract
@dataclass(frozen=True, slots=True)
class Contract:
    """The names and consumer settings of one engine's contract, as handler runtimes
    use them (``RuntimeEnv.contract``)."""

    engine: str

    @property
    def dagnats(self) -> bool:
        return self.engine == DAGNATS

    def consumer_name(self, task_type: str, group: str | None) -> str:
        if self.dagnats:
            return consumer_name(task_type, group)
        return n.consumer_name(task_type, group)

    def task_filter(self, task_type: str, group: str | None) -> str:
        if self.dagnats:
            return task_filter(task_type, group)
        return n.task_filter(task_type, group)

    def group_name(self, task_type: str, group: str | None) -> str:
        """The elastic consumer group of a partitioned handler."""
        if self.dagnats:
            return group_name(task_type, group)
        return n.consumer_name(task_type, group)

    def partition_filter(self, task_type: str, group: str | None) -> str:
        """The partitioning filter: standalone partitions by the key token
        (``task.{type}.*``, wildcard 1); DagNats by the whole subject
        (``task.{type}.>``, no partitioning wildcard)."""
        if self.dagnats:
            return task_filter(task_type, group)
        return f"task.{task_type}.{group}.*" if group else f"task.{task_type}.*"

    @property
    def partitioning_wildcards(self) -> tuple[int, ...] | None:
        return None if self.dagnats else (1,)

    @property
    def max_buffered_msg(self) -> int:
        return MAX_BUFFERED_MSGS if self.dagnats else 0


STANDALONE_CONTRACT = Contract(STANDALONE)
DAGNATS_CONTRACT = Contract(DAGNATS)
