"""Task payloads and lifecycle events, as they travel on the wire (see DESIGN.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from ._errors import PayloadError

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
TERMINAL_KINDS = frozenset({NON_RETRIABLE, EXHAUSTED, INVALID_PAYLOAD})

_SCALARS = frozenset({str, int, float, bool})
_std_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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
    """Normalise an input/output: bytes must hold JSON; other values must be encodable."""
    if value is None or type(value) in _SCALARS:
        return value  # hot path: nothing to check (NaN/inf are written as the stdlib does)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            return None
        try:
            return loads(raw)
        except ValueError as e:
            raise PayloadError(f"{what} bytes are not valid JSON: {e}") from None
    try:
        dumps(value)
    except (TypeError, ValueError) as e:
        raise PayloadError(f"{what} is not JSON-serialisable: {e}") from None
    return value


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
    def decode(cls, data: bytes) -> TaskPayload:
        """Parse a task body; raise :class:`PayloadError` saying what is wrong."""
        try:
            obj = loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise PayloadError(f"task payload is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise PayloadError(f"task payload must be a JSON object, got {type(obj).__name__}")
        try:
            run_id = obj["run_id"]
            task_id = obj.get("task_id") or run_id
            step_id = obj.get("step_id") or "main"
            iteration = int(obj.get("iteration") or 0)
            attempt = int(obj.get("attempt") or 1)
            metadata = obj.get("metadata") or {}
        except (KeyError, TypeError, ValueError) as e:
            raise PayloadError(f"task payload is missing or has a bad field: {e}") from None
        if not isinstance(run_id, str) or not isinstance(step_id, str) or not run_id:
            raise PayloadError("task payload run_id/step_id must be non-empty strings")
        if not isinstance(metadata, dict):
            raise PayloadError("task payload metadata must be an object")
        return cls(
            task_id=str(task_id),
            run_id=run_id,
            step_id=step_id,
            iteration=iteration,
            attempt=attempt,
            input=obj.get("input"),
            metadata={str(k): str(v) for k, v in metadata.items()},
            traceparent=str(obj.get("traceparent") or ""),
            tracestate=str(obj.get("tracestate") or ""),
        )


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
        {
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
    )
