"""The task context handed to every handler: input, task info and the outcome calls.

Outcome calls (``complete``, ``fail``, ``fail_permanent``, ``fail_retry_after``,
``continue_``) only *record* the outcome; the worker applies it (publishes the event,
acks/naks) when the handler returns. That makes them usable from plain ``def`` handlers
running in a thread, and means exactly one outcome per execution: a second call raises
:class:`OutcomeAlreadySetError` and the first one stands.

If a handler returns without calling any of them, its return value is the output:
``return {"sent": True}`` is the same as ``ctx.complete({"sent": True})``.

Calls that do I/O (``heartbeat``, ``stream``, ``checkpoint``, ``load_checkpoint``,
``wait_for_signal``, ``send_signal``) are coroutines; from a plain ``def`` handler run
them with ``ctx.run(coro)``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._duration import Duration, seconds
from ._errors import OutcomeAlreadySetError, TaskError
from ._retry import clamp_retry_after
from ._services import CorruptValueError
from ._wire import JSON, TaskPayload, to_json_value

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ._services import Services

T = TypeVar("T")
OutcomeKind = Literal["complete", "fail", "permanent", "retry_after", "continue", "cancelled"]


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What is known about the running task."""

    task_type: str
    task_id: str
    run_id: str
    step_id: str
    attempt: int
    iteration: int
    metadata: dict[str, str]
    group: str | None
    subject: str
    stream_sequence: int


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    output: JSON = None
    error: str = ""
    delay: float | None = None
    #: the handler's traceback when it raised (kept in ``step.failed`` events)
    traceback: str | None = None


class TaskCancelledError(TaskError):
    """Raised inside a handler (at its next await) when its task was cancelled."""


class TaskContext:
    """Per-execution handle given to a handler. Not thread-safe except as documented."""

    __slots__ = (
        "_cancel_reason",
        "_cancelled",
        "_checkpointed",
        "_chunks",
        "_input_bytes",
        "_loop",
        "_msg",
        "_outcome",
        "_payload",
        "_services",
        "info",
    )

    def __init__(
        self,
        info: TaskInfo,
        payload: TaskPayload,
        msg: Msg,
        services: Services,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.info = info
        self._payload = payload
        self._msg = msg
        self._services = services
        self._loop = loop
        self._outcome: Outcome | None = None
        self._input_bytes: bytes | None = None
        self._cancelled = False
        self._cancel_reason = ""
        self._chunks = 0
        # True once this execution saved or found a checkpoint: only then does the
        # outcome clear it (a purge per task would write a marker for every task).
        self._checkpointed = False

    # ------------------------------------------------------------------ input
    @property
    def input(self) -> bytes:
        """The task input as JSON bytes (``b"null"`` when none was given)."""
        if self._input_bytes is None:
            self._input_bytes = json.dumps(self._payload.input, separators=(",", ":")).encode()
        return self._input_bytes

    def json(self) -> Any:
        """The task input, decoded from JSON."""
        return self._payload.input

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def step_id(self) -> str:
        return self.info.step_id

    @property
    def attempt(self) -> int:
        return self.info.attempt

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    # --------------------------------------------------------------- outcomes
    def _set(self, outcome: Outcome) -> None:
        if self._outcome is not None:
            raise OutcomeAlreadySetError(
                f"task {self.info.run_id}/{self.info.step_id} already has outcome "
                f"{self._outcome.kind!r}; {outcome.kind!r} refused (call exactly one of "
                "complete, fail, fail_permanent, fail_retry_after, continue_)"
            )
        self._outcome = outcome

    def complete(self, output: object = None) -> None:
        """Finish successfully with ``output`` (JSON bytes or any JSON-serialisable value)."""
        self._set(Outcome("complete", to_json_value(output, "output")))

    def fail(self, error: object) -> None:
        """Retriable failure: redelivered after the handler's retry policy delay."""
        self._set(Outcome("fail", error=_err(error)))

    def fail_permanent(self, error: object) -> None:
        """Non-retriable failure: the task is terminated and dead-lettered."""
        self._set(Outcome("permanent", error=_err(error)))

    def fail_retry_after(self, error: object, delay: Duration) -> None:
        """Retriable failure redelivered after exactly ``delay`` (clamped to 100 ms - 1 h)."""
        self._set(Outcome("retry_after", error=_err(error), delay=clamp_retry_after(delay)))

    def continue_(self, output: object = None) -> None:
        """Finish this iteration and enqueue the next one (``iteration + 1``) with
        ``output`` as its input. Bounded by the handler's ``max_iterations``."""
        self._set(Outcome("continue", to_json_value(output, "output")))

    # ------------------------------------------------------------------- I/O
    async def heartbeat(self) -> None:
        """Extend the lease now (``in_progress``). The worker also does this on its own."""
        await self._msg.in_progress()

    async def stream(self, chunk: object) -> None:
        """Publish a partial result on ``stream.{run_id}.{step_id}`` (core NATS, not
        persisted). Chunks carry a ``Jsw-Seq`` header (1, 2, ...) and the outcome event
        records how many were sent, so a client can tell it saw them all, in order."""
        self._chunks += 1
        await self._services.publish_chunk(self.info, chunk, self._chunks)

    async def checkpoint(self, state: object) -> None:
        """Save ``state`` (JSON) in KV ``checkpoints`` under ``{run_id}.{step_id}``. In
        DagNats mode ``bytes`` are stored as they are (as DagNats's ``Checkpoint``)."""
        await self._services.save_checkpoint(self.info, state)
        self._checkpointed = True

    async def load_checkpoint(self) -> Any:
        """The last saved checkpoint, or ``None``. Raises :class:`CorruptValueError` when
        the stored value is not JSON (it is still deleted when the task finishes)."""
        try:
            state = await self._services.load_checkpoint(self.info)
        except CorruptValueError:
            self._checkpointed = True
            raise
        if state is not None:
            self._checkpointed = True
        return state

    async def load_checkpoint_bytes(self) -> bytes | None:
        """The last saved checkpoint as stored (raw bytes), or ``None``: for values a
        DagNats Go worker saved, which need not be JSON."""
        state = await self._services.load_checkpoint_bytes(self.info)
        if state is not None:
            self._checkpointed = True
        return state

    async def wait_for_signal_bytes(self, name: str, timeout: Duration) -> bytes:
        """As :meth:`wait_for_signal`, the value as stored (raw bytes)."""
        t = seconds(timeout, name="timeout", maximum=3600.0)
        return await self._services.wait_for_signal_bytes(self.info.run_id, name, t)

    async def wait_for_signal(self, name: str, timeout: Duration) -> Any:
        """Wait for signal ``name`` of this run (sent before or after this call).

        ``timeout`` must be in (0, 1 h]; raises :class:`SignalTimeoutError` when it passes
        and :class:`CorruptValueError` when the signal's value is not JSON.
        """
        t = seconds(timeout, name="timeout", maximum=3600.0)
        return await self._services.wait_for_signal(self.info.run_id, name, t)

    async def send_signal(self, run_id: str, name: str, data: object = None) -> None:
        """Send signal ``name`` to run ``run_id``."""
        await self._services.send_signal(run_id, name, data)

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled; the handler should stop soon."""
        return self._cancelled

    @property
    def chunks_sent(self) -> int:
        return self._chunks

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        """Run one of the context's coroutines from a plain ``def`` handler's thread."""

        async def _wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(_wrap(), self._loop).result()


def _err(error: object) -> str:
    if isinstance(error, BaseException):
        text = str(error)
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return str(error)


HandlerResult = Awaitable[object] | object
Handler = Callable[[TaskContext], Any]
