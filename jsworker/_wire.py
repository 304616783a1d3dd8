"""Task payloads and lifecycle events, as they travel on the wire (docs/wire.md).

Nothing read from the wire is trusted: :meth:`TaskPayload.decode` applies the same rules
to a body published by another program as :class:`~jsworker.Client` applies before it
publishes (``_names.py``), so a body the worker accepts can always have its outcome
recorded. :func:`shrink_to_fit` makes an event or dead letter that would exceed the
server's ``max_payload`` fit, keeping a prefix, the size and a sha256 of what it cut.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from . import _names as n
from ._errors import InvalidNameError, PayloadError

JSON = Any

STEP_STARTED = "step.started"
STEP_COMPLETED = "step.completed"
STEP_FAILED = "step.failed"
STEP_CONTINUE = "step.continue"
STEP_CANCELLED = "step.cancelled"

# failure kinds carried in a step.failed event's payload["kind"]
RETRIABLE = "retriable"
NON_RETRIABLE = "non_retriable"
RETRY_AFTER = "retry_after"
EXHAUSTED = "exhausted"
INVALID_PAYLOAD = "invalid_payload"
#: the outcome could never be recorded as it was (too large, invalid subject, encoding),
#: or not within the bounded number of deliveries: recorded as this failure instead
UNRECORDABLE = "unrecordable"
#: a hard-sticky task whose worker was gone for longer than the limit (docs/wire.md)
STICKY_WORKER_GONE = "sticky_worker_gone"
TERMINAL_KINDS = frozenset(
    {NON_RETRIABLE, EXHAUSTED, INVALID_PAYLOAD, UNRECORDABLE, STICKY_WORKER_GONE}
)

#: the largest iteration a body may carry (Go's int32 range, far past any max_iterations)
MAX_ITERATION = 2**31 - 1
#: trace context longer than this is ignored, as W3C trace context says of invalid values
MAX_TRACE_LEN = 512

_SCALARS = frozenset({str, int, bool})
_std_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(value: JSON) -> bytes:
    """Compact JSON. orjson on the hot path (events and payloads are encoded for every
    task); the standard library for what orjson refuses (ints over 64 bits, non-string
    keys), so the same values are accepted either way."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return _std_dumps(value).encode()


def loads(data: bytes | str) -> JSON:
    return orjson.loads(data)


def to_json_value(value: object, what: str) -> JSON:
    """Normalise an input/output: bytes must hold JSON; other values must be encodable.

    ``NaN`` and infinities are refused (:class:`PayloadError`): JSON has no such numbers
    and orjson would write them as ``null``, silently changing the value."""
    if value is None or type(value) in _SCALARS:
        return value  # hot path: nothing to check
    if type(value) is float:
        if not math.isfinite(value):
            raise PayloadError(f"{what} is {value}: JSON has no NaN or infinity")
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            return None
        try:
            return loads(raw)  # orjson refuses NaN/Infinity and numbers past a double
        except ValueError as e:
            raise PayloadError(f"{what} bytes are not valid JSON: {e}") from None
    try:
        data = dumps(value)
    except (TypeError, ValueError) as e:
        raise PayloadError(f"{what} is not JSON-serialisable: {e}") from None
    # orjson writes NaN/inf as null, so only an output holding null can hide one
    if b"null" in data:
        bad = _non_finite(value)
        if bad is not None:
            raise PayloadError(
                f"{what} holds {bad} at {bad_path(value)}: JSON has no NaN or infinity"
            )
    return value


def _non_finite(value: object) -> float | None:
    """The first NaN/infinity inside dicts, lists and tuples, or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return v
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return None


def bad_path(value: object, path: str = "$") -> str:
    """JSONPath-like location of the first NaN/infinity in ``value`` (for the error)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    for p, v in items:
        if _non_finite(v) is not None:
            return bad_path(v, p)
    return path


def headers_size(headers: Mapping[str, str] | None) -> int:
    """Bytes the headers add to a message, as nats-py encodes them (``NATS/1.0`` line,
    ``Key: value`` lines, blank line). The server's ``max_payload`` limits headers plus
    body; nats-py checks only the body, and the server drops the connection of a
    publisher that exceeds it, so callers check the sum themselves."""
    if headers is None:
        return 0
    size = len(b"NATS/1.0\r\n\r\n")
    for k, v in headers.items():
        key = k.strip()
        if key:
            size += len(key.encode()) + 2 + len(v.strip().encode()) + 2
    return size


_second: list[Any] = [None, ""]  # [whole second, its "YYYY-MM-DDTHH:MM:SS"]


def now_rfc3339() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (two per task: the date part is
    formatted once per second)."""
    now = time.time()
    sec = int(now)
    if _second[0] != sec:
        _second[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = sec
    return f"{_second[1]}.{int((now - sec) * 1e6):06d}Z"


@dataclass(frozen=True, slots=True)
class TaskPayload:
    """The JSON body of a message on ``task.>``."""

    task_id: str
    run_id: str
    step_id: str
    iteration: int = 0
    attempt: int = 1
    input: JSON = None
    metadata: dict[str, str] = field(default_factory=dict)
    traceparent: str = ""
    tracestate: str = ""

    def encode(self) -> bytes:
        return dumps(
            {
                "task_id": self.task_id,
                "run_id": self.run_id,
                "step_id": self.step_id,
                "iteration": self.iteration,
                "attempt": self.attempt,
                "input": self.input,
                "metadata": self.metadata,
                "traceparent": self.traceparent,
                "tracestate": self.tracestate,
            }
        )

    @classmethod
    def decode(cls, data: bytes, subject: str | None = None) -> TaskPayload:
        """Parse and validate a task body; raise :class:`PayloadError` saying what is wrong.

        The rules are the client's (docs/wire.md, "Task body"): ``run_id`` is required;
        ``run_id``, ``step_id`` (default ``main``) and ``task_id`` (default the run id) are
        subject tokens of at most 128 characters; ``iteration`` is an int in
        [0, 2^31-1]; ``metadata`` an object (values become strings); ``traceparent`` /
        ``tracestate`` that are not strings of at most 512 characters are ignored. Unknown
        fields are ignored. With ``subject`` (the task subject, ``task.{type}.{key}`` or
        ``task.{type}.{group}.{key}``), its group and key tokens are checked too; the
        key need not equal the run id (the body wins, see docs/wire.md).
        """
        try:
            obj = loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise PayloadError(f"task payload is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise PayloadError(f"task payload must be a JSON object, got {type(obj).__name__}")
        try:
            if "run_id" not in obj:
                raise PayloadError("task payload has no run_id")
            run_id = n.validate_run_id(obj["run_id"])
            step_id = n.validate_step_id(obj.get("step_id") or "main")
            task_id = n.validate_task_id(obj.get("task_id") or run_id)
            if subject is not None:
                check_task_subject(subject)
        except InvalidNameError as e:
            raise PayloadError(f"task payload: {e}") from None
        iteration = _int_field(obj, "iteration", 0)
        attempt = _int_field(obj, "attempt", 1)
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise PayloadError(
                f"task payload metadata must be an object, got {type(metadata).__name__}"
            )
        return cls(
            task_id=task_id,
            run_id=run_id,
            step_id=step_id,
            iteration=iteration,
            attempt=attempt,
            input=obj.get("input"),
            metadata={str(k): v if isinstance(v, str) else _text(v) for k, v in metadata.items()},
            traceparent=_trace_field(obj.get("traceparent")),
            tracestate=_trace_field(obj.get("tracestate")),
        )


def _int_field(obj: dict[str, Any], name: str, default: int) -> int:
    value = obj.get(name)
    if value is None:
        return default
    if type(value) is not int or not 0 <= value <= MAX_ITERATION:
        raise PayloadError(
            f"task payload {name} must be an integer between 0 and {MAX_ITERATION}, "
            f"got {_text(value)[:40]}"
        )
    return value


def _trace_field(value: object) -> str:
    return value if isinstance(value, str) and len(value) <= MAX_TRACE_LEN else ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else dumps(value).decode()


def check_task_subject(subject: str) -> None:
    """Raise :class:`InvalidNameError` unless ``subject`` is ``task.{type}.{key}`` or
    ``task.{type}.{group}.{key}`` with valid tokens (the type is the consumer's)."""
    tokens = subject.split(".")
    if tokens[0] != "task" or len(tokens) not in (3, 4):
        raise InvalidNameError(
            f"task subject {subject[:200]!r} is not task.{{type}}.{{key}} or "
            "task.{type}.{group}.{key}"
        )
    if len(tokens) == 4:
        n.validate_group(tokens[2])
    n.validate_key(tokens[-1])


# ----------------------------------------------------------------- shrink to fit
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _walk(doc: dict[str, Any], path: Sequence[str]) -> dict[str, Any] | None:
    cur: Any = doc
    for key in path:
        cur = cur.get(key) if isinstance(cur, dict) else None
    return cur if isinstance(cur, dict) else None


def _escaped_len(text: str) -> int:
    return len(orjson.dumps(text)) - 2


def prefix_within(text: str, room: int) -> str:
    """The longest prefix of ``text`` whose JSON string encoding (without the quotes)
    takes at most ``room`` bytes. Never splits a character."""
    if room <= 0:
        return ""
    cut = text.encode()[:room].decode(errors="ignore")
    while cut and _escaped_len(cut) > room:
        # escapes (quotes, backslashes, control characters) take more than one byte
        cut = cut[: max(0, len(cut) * room // _escaped_len(cut) - 1)]
    return cut


def shrink_to_fit(doc: dict[str, Any], paths: Sequence[Sequence[str]], limit: int) -> bytes:
    """Encode ``doc`` in at most ``limit`` bytes, or raise :class:`PayloadError`.

    When the whole document is too large, the values at ``paths`` (largest first, only as
    many as needed) are replaced by a prefix of their text, and for each such field ``f``
    the document gains ``f_truncated: true``, ``f_size`` (bytes of the full text) and
    ``f_sha256`` (hex sha256 of those bytes). The text of a string is the string itself
    (UTF-8); of any other value, its compact JSON encoding. ``doc`` is modified in place.
    """
    data = dumps(doc)
    if len(data) <= limit:
        return data
    full = len(data)
    fields = []
    for path in paths:
        parent = _walk(doc, path[:-1])
        if parent is None or path[-1] not in parent:
            continue
        raw = _text(parent[path[-1]]).encode()
        fields.append((len(raw), parent, path[-1], raw))
    fields.sort(key=lambda f: f[0], reverse=True)
    cut: list[tuple[int, dict[str, Any], str, bytes]] = []
    for size, parent, key, raw in fields:
        parent[key] = ""
        parent[f"{key}_truncated"] = True
        parent[f"{key}_size"] = size
        parent[f"{key}_sha256"] = sha256_hex(raw)
        cut.append((size, parent, key, raw))
        data = dumps(doc)
        if len(data) <= limit:
            break
    if len(data) > limit:
        names = ", ".join(key for _, _, key, _ in cut)
        raise PayloadError(
            f"is {full} bytes, over the limit of {limit} bytes"
            + (f" even with {names} truncated" if names else "")
        )
    # share the room left among the truncated fields, the smallest first
    room = limit - len(data)
    cut.sort(key=lambda f: f[0])
    for i, (_, parent, key, raw) in enumerate(cut):
        parent[key] = prefix_within(raw.decode(errors="replace"), room // (len(cut) - i))
        room -= _escaped_len(parent[key])
    return dumps(doc)


def event_msg_id(
    run_id: str, step_id: str, event_type: str, suffix: int | str | None = None
) -> str:
    """``Nats-Msg-Id`` of a lifecycle event: ``{run}.{step}.{type}[.{n}]``.

    ``n`` is the attempt for ``step.started`` and retriable ``step.failed`` (each attempt
    records once) and the iteration for ``step.continue``; terminal events have none, so a
    redelivered task never records its outcome twice.
    """
    base = f"{run_id}.{step_id}.{event_type}"
    return base if suffix is None else f"{base}.{suffix}"


def encode_event(
    event_type: str,
    *,
    run_id: str,
    step_id: str,
    payload: JSON,
    worker_id: str,
    attempt: int,
    trace_parent: str = "",
    trace_state: str = "",
) -> bytes:
    return dumps(
        event_doc(
            event_type,
            run_id=run_id,
            step_id=step_id,
            payload=payload,
            worker_id=worker_id,
            attempt=attempt,
            trace_parent=trace_parent,
            trace_state=trace_state,
        )
    )


def event_doc(
    event_type: str,
    *,
    run_id: str,
    step_id: str,
    payload: JSON,
    worker_id: str,
    attempt: int,
    trace_parent: str = "",
    trace_state: str = "",
) -> dict[str, Any]:
    """A lifecycle event (docs/wire.md, "Events"). The body's ``traceparent`` /
    ``tracestate`` are written as ``trace_parent`` / ``trace_state``, the Go engine's
    event field names."""
    return {
        "type": event_type,
        "run_id": run_id,
        "step_id": step_id,
        "timestamp": now_rfc3339(),
        "payload": payload,
        "worker_id": worker_id,
        "attempt_number": attempt,
        "trace_parent": trace_parent,
        "trace_state": trace_state,
    }
