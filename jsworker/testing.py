"""Unit-test handlers without a NATS server.

:class:`HandlerEnvironment` runs a handler once with a real :class:`TaskContext` whose
I/O (checkpoints, signals, streamed chunks, heartbeats) stays in memory, and reports the
outcome exactly as the worker would map it: the same code decides what a return value,
an outcome call or a raised exception means (see ``docs/testing.md``)::

    env = HandlerEnvironment(signals={"approved": True})
    result = await env.run(my_handler, {"order": 7})
    assert result.kind == "complete" and result.output == {"shipped": 7}

Like Temporal's ``ActivityEnvironment``: nothing here is on the wire, so retries,
dead letters and events are not produced; ``result.kind`` says which would be.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from nats.aio.msg import Msg

from . import _wire as w
from ._context import Outcome, OutcomeKind, TaskContext, TaskInfo
from ._errors import NotProvisionedError
from ._executor import call_handler
from ._handler import DEFAULT_ACK_WAIT, make_spec
from ._retry import RetryPolicy
from ._services import Services, SignalTimeoutError

__all__ = ["HandlerEnvironment", "HandlerResult"]


@dataclass
class HandlerResult:
    """What one execution did.

    ``kind``: ``complete``, ``fail`` (retriable), ``permanent``, ``retry_after``,
    ``continue`` or ``cancelled``. ``output`` for complete/continue; ``error``,
    ``traceback`` and ``delay`` for failures. ``chunks``: what ``ctx.stream`` sent, in
    order. ``checkpoints``: every state ``ctx.checkpoint`` saved. ``heartbeats``: how
    often ``ctx.heartbeat`` was called. ``signals_sent``: ``(run_id, name, data)``."""

    kind: OutcomeKind
    output: Any = None
    error: str = ""
    delay: float | None = None
    traceback: str | None = None
    chunks: list[Any] = field(default_factory=list)
    checkpoints: list[Any] = field(default_factory=list)
    heartbeats: int = 0
    signals_sent: list[tuple[str, str, Any]] = field(default_factory=list)


class HandlerEnvironment:
    """A fake worker around one handler call.

    Args:
        task_type: the type the handler sees in ``ctx.info`` (default ``"test"``).
        run_id / step_id / task_id: ids (defaults: random / the task type / ``{run}.{step}``).
        attempt: delivery attempt, from 1 (default 1).
        iteration: ``continue_`` iteration (default 0).
        metadata: task metadata (default empty).
        group: the worker group the task came from (default none).
        checkpoint: the checkpoint ``load_checkpoint`` returns (default ``None``).
        signals: signals already sent to the run, by name; ``wait_for_signal`` for a
            name not here raises :class:`SignalTimeoutError` at once (no real waiting).
        checkpoints_enabled / signals_enabled: ``False`` makes those calls raise
            ``NotProvisionedError``, as a worker without the optional buckets does.
    """

    def __init__(
        self,
        *,
        task_type: str = "test",
        run_id: str | None = None,
        step_id: str | None = None,
        task_id: str | None = None,
        attempt: int = 1,
        iteration: int = 0,
        metadata: dict[str, str] | None = None,
        group: str | None = None,
        checkpoint: Any = None,
        signals: dict[str, Any] | None = None,
        checkpoints_enabled: bool = True,
        signals_enabled: bool = True,
    ) -> None:
        self.task_type = task_type
        self.run_id = run_id or f"run-{secrets.token_hex(8)}"
        self.step_id = step_id or task_type
        self.task_id = task_id or f"{self.run_id}.{self.step_id}"
        self.attempt = attempt
        self.iteration = iteration
        self.metadata = dict(metadata or {})
        self.group = group
        self.checkpoint = checkpoint
        self.signals = dict(signals or {})
        self.checkpoints_enabled = checkpoints_enabled
        self.signals_enabled = signals_enabled

    async def run(
        self,
        handler: Callable[..., Any],
        input: Any = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> HandlerResult:
        """Call ``handler`` once with ``input`` (any JSON value) and return the result.
        ``input`` is checked as a real submit would check it (``PayloadError``)."""
        spec = make_spec(
            self.task_type,
            handler,
            ack_wait=None,
            retry=retry,
            max_iterations=None,
            default_ack_wait=DEFAULT_ACK_WAIT,
            default_retry=RetryPolicy(),
        )
        payload = w.TaskPayload(
            task_id=self.task_id,
            run_id=self.run_id,
            step_id=self.step_id,
            iteration=self.iteration,
            attempt=self.attempt,
            input=w.to_json_value(input, "input"),
            metadata=self.metadata,
        )
        subject = (
            f"task.{self.task_type}.{self.group}.{self.run_id}"
            if self.group
            else f"task.{self.task_type}.{self.run_id}"
        )
        info = TaskInfo(
            task_type=self.task_type,
            task_id=self.task_id,
            run_id=self.run_id,
            step_id=self.step_id,
            attempt=self.attempt,
            iteration=self.iteration,
            metadata=self.metadata,
            group=self.group,
            subject=subject,
            stream_sequence=1,
        )
        result = HandlerResult(kind="complete")
        services = _MemoryServices(self, result)
        msg = _MemoryMsg(result)
        ctx = TaskContext(info, payload, cast(Msg, msg), services, asyncio.get_running_loop())
        outcome: Outcome = await call_handler(spec, ctx)
        result.kind = outcome.kind
        result.output = outcome.output
        result.error = outcome.error
        result.delay = outcome.delay
        result.traceback = outcome.traceback
        return result


class _MemoryMsg:
    def __init__(self, result: HandlerResult) -> None:
        self._result = result

    async def in_progress(self) -> None:
        self._result.heartbeats += 1


class _MemoryServices(Services):
    """The task context's I/O, in memory (never touches a connection)."""

    def __init__(self, env: HandlerEnvironment, result: HandlerResult) -> None:
        # no super().__init__: there is no connection to bind
        self._env = env
        self._result = result

    def _check(self, enabled: bool, what: str) -> None:
        if not enabled:
            raise NotProvisionedError(f"KV bucket {what!r} does not exist (in this test)")

    async def save_checkpoint(self, info: TaskInfo, state: object) -> None:
        self._check(self._env.checkpoints_enabled, "checkpoints")
        value = _copy(state, "checkpoint")
        self._result.checkpoints.append(value)
        self._env.checkpoint = value

    async def load_checkpoint(self, info: TaskInfo) -> Any:
        self._check(self._env.checkpoints_enabled, "checkpoints")
        return self._env.checkpoint

    async def wait_for_signal(self, run_id: str, name: str, timeout: float) -> Any:
        self._check(self._env.signals_enabled, "signals")
        if name in self._env.signals:
            return self._env.signals[name]
        raise SignalTimeoutError(f"signal {name!r} for run {run_id} was not given to the test")

    async def send_signal(self, run_id: str, name: str, data: object = None) -> int:
        self._check(self._env.signals_enabled, "signals")
        self._result.signals_sent.append((run_id, name, _copy(data, "signal data")))
        return len(self._result.signals_sent)

    async def publish_chunk(self, info: TaskInfo, chunk: object, seq: int) -> None:
        self._result.chunks.append(_copy(chunk, "chunk"))


def _copy(value: object, what: str) -> Any:
    """The value as a worker would store it: checked, and a copy (later changes to the
    handler's own object do not rewrite what was recorded)."""
    return json.loads(w.dumps(w.to_json_value(value, what)))
