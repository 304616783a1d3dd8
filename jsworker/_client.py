"""Submitting tasks and waiting for their outcome."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from . import _names as n
from . import _wire as w
from ._aio import raise_if_cancelling
from ._errors import (
    ConfigError,
    JSWorkerError,
    NotProvisionedError,
    PayloadError,
    ServerError,
    TaskFailed,
    TaskTimeout,
)
from ._pubacks import PubAck, shared_pubacks
from ._services import CHUNK_SEQ, Services
from ._sticky import bindings_kv, route, sticky_headers, validate_mode
from ._telemetry import Telemetry, current_traceparent


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One item of :meth:`TaskHandle.stream`: a partial result (``final`` False, ``seq``
    1, 2, ...) or, last, the task's output (``final`` True)."""

    data: Any
    seq: int | None = None
    final: bool = False


@dataclass(frozen=True)
class TaskRequest:
    """One task for :meth:`Client.submit_many` (fields as :meth:`Client.submit`)."""

    task_type: str
    input: Any = None
    group: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    metadata: Mapping[str, str] | None = None
    key: str | None = None
    sticky: str | None = None
    last_step: bool = False


#: seconds a "does a worker serve this type?" check is reused for the same task type and
#: group (a hot submit loop checks once per this many seconds, not once per task)
LISTENING_TTL = 5.0
#: seconds that check may take (it runs alongside the first publish); one that fails or
#: takes longer (e.g. a submit-only user may not list consumers) is not tried again by
#: this client for :data:`LISTENING_GIVE_UP` seconds, and warns of nothing
LISTENING_TIMEOUT = 2.0
LISTENING_GIVE_UP = 3600.0


class NoWorkerWarning(UserWarning):
    """:meth:`Client.submit` stored a task that no live worker serves: no consumer of
    ``TASK_QUEUES`` whose filter covers its subject has a pull request waiting (or a
    recent delivery), and no live worker in the directory lists its type (and group).
    The task is not lost: it waits in ``TASK_QUEUES`` until such a worker starts."""


def no_worker_message(subject: str) -> str:
    """The warning for a task on ``subject`` that nobody serves (as `jsworker dead
    replay` says it)."""
    return (
        f"no worker is listening for {subject.rsplit('.', 1)[0]}: the task waits in "
        f"{n.TASK_STREAM} until one starts (`jsworker workers` lists the live ones)"
    )


def retry_line(ev: Any, step_id: str) -> str | None:
    """One line for a retriable failure of step ``step_id`` (``attempt 1 failed
    (retriable), retrying in 5 s: the error``), or None for any other event (or a
    foreign body)."""
    if not isinstance(ev, dict) or ev.get("step_id") != step_id:
        return None
    p = ev.get("payload")
    p = p if isinstance(p, dict) else {}
    kind = p.get("kind")
    if ev.get("type") != w.STEP_FAILED or kind not in (w.RETRIABLE, w.RETRY_AFTER):
        return None
    attempt = p.get("attempt", ev.get("attempt", "?"))
    ms = p.get("retry_in_ms", p.get("retry_after_ms"))
    when = "retrying"
    if isinstance(ms, int | float) and not isinstance(ms, bool):
        when = f"retrying in {ms / 1000:g} s"
    error = str(p.get("error", "")).strip().splitlines()
    return f"attempt {attempt} failed ({kind}), {when}" + (f": {error[0][:200]}" if error else "")


#: seconds without an event after which a follow (run_events without a timeout, so
#: wait_outcome too) checks that its consumer still exists
OUTCOME_CHECK = 5.0


class TaskHandle:
    """A submitted task. ``duplicate`` is True when the server had already seen its id.
    ``listening``: whether a live worker served the task's subject when it was submitted
    (False: see :class:`NoWorkerWarning`; None: not checked, e.g. a sticky task)."""

    def __init__(
        self,
        client: Client,
        task_type: str,
        run_id: str,
        step_id: str,
        task_id: str,
        subject: str,
        duplicate: bool,
        sequence: int,
        chunk_sub: Subscription | None = None,
        listening: bool | None = None,
    ) -> None:
        self.client = client
        self.task_type = task_type
        self.run_id = run_id
        self.step_id = step_id
        self.task_id = task_id
        self.subject = subject
        self.duplicate = duplicate
        self.sequence = sequence
        self._chunk_sub = chunk_sub
        self.listening = listening

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_type!r}, run_id={self.run_id!r}, step_id={self.step_id!r})"

    async def follow_retries(self, emit: Callable[[str], None]) -> None:
        """Call ``emit`` with one line (:func:`retry_line`) per retriable failure of
        this task as it is recorded; runs until cancelled (``--wait`` runs it beside
        :meth:`result`)."""
        async for ev in self.client.run_events(self.run_id):
            line = retry_line(ev, self.step_id)
            if line is not None:
                emit(line)

    async def events(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every lifecycle event of this task's step, from the start, as dicts."""
        async for ev in self.client.run_events(self.run_id, timeout=timeout):
            if ev.get("step_id") == self.step_id:
                yield ev

    async def result(self, timeout: float | None = 60.0) -> Any:
        """Wait for the outcome: the output on success; :class:`TaskFailed` on a
        terminal failure; :class:`TaskTimeout` when ``timeout`` seconds pass first."""
        ev = await self.client.wait_outcome(self.run_id, self.step_id, timeout=timeout)
        return ev.get("payload", {}).get("output")

    async def cancel(self, reason: str = "") -> None:
        """Cancel this task's run: queued tasks never start, running ones are asked to
        stop; the outcome is ``step.cancelled`` (``result()`` raises ``TaskFailed`` with
        kind ``cancelled``)."""
        await self.client.cancel(self.run_id, reason)

    async def stream(self, timeout: float | None = 60.0) -> AsyncIterator[StreamItem]:
        """Partial results in order, then the final output (``StreamItem.final``).

        Submit with ``stream=True`` to be subscribed before the task can start; without
        it, chunks published before this call are not seen (they are not persisted).
        Raises ``TaskFailed`` on a terminal failure, ``TaskTimeout`` after ``timeout``.
        """
        sub = self._chunk_sub
        self._chunk_sub = None
        if sub is None:
            sub = await self.client.nc.subscribe(n.stream_subject(self.run_id, self.step_id))
        outcome = asyncio.ensure_future(
            self.client.wait_outcome(self.run_id, self.step_id, timeout=timeout)
        )
        expected: int | None = None
        seen = 0
        # One pending read is kept across iterations and never cancelled mid-way:
        # cancelling a read can drop the message it was about to return.
        nxt: asyncio.Future[Msg] | None = None
        try:
            while expected is None or seen < expected:
                if nxt is None:
                    nxt = asyncio.ensure_future(sub.next_msg(timeout=3600))
                waiting: set[asyncio.Future[Any]] = {nxt, outcome} if expected is None else {nxt}
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=None if expected is None else 2.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if nxt in done:
                    msg = nxt.result()
                    nxt = None
                    seq = int((msg.headers or {}).get(CHUNK_SEQ, seen + 1))
                    seen = max(seen, seq)
                    yield StreamItem(json.loads(msg.data) if msg.data else None, seq)
                    continue
                if expected is not None:
                    break  # the rest did not arrive within 2 s of the outcome
                ev = outcome.result()  # raises TaskFailed / TaskTimeout
                expected = int((ev.get("payload") or {}).get("chunks") or 0)
            ev = await outcome
            yield StreamItem((ev.get("payload") or {}).get("output"), None, True)
        finally:
            if nxt is not None:
                nxt.cancel()
            if not outcome.done():
                outcome.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Client:
    """Submit tasks to jsworker workers (any language) and read their outcome.

    ``submit`` publishes ``task.{type}[.{group}].{run_id}`` with ``Nats-Msg-Id``
    ``{run_id}.{step_id}.0``: submitting the same run and step twice is recorded once
    (within the stream's 10 min duplicate window).
    """

    def __init__(
        self, nc: NATS, *, telemetry: Telemetry | None = None, warn_no_worker: bool = True
    ) -> None:
        """``telemetry``: with a tracer provider, every submit is a PRODUCER span whose
        context the task carries, so the worker's span is its child (default: off; an
        active span of your own is still propagated).

        ``warn_no_worker`` (default True): ``submit`` / ``submit_many`` issue a
        :class:`NoWorkerWarning` (a warning, not an error: a worker may start later)
        for a task no live worker serves; False keeps quiet. Either way
        ``handle.listening`` says it (the check is cached per task type and group for
        :data:`LISTENING_TTL` seconds); the CLI and the interactive session print it."""
        if nc is None or not hasattr(nc, "jetstream"):
            raise ConfigError(f"Client needs a NATS client (nc), got {type(nc).__name__}")
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            raise ConfigError(
                f"telemetry must be a jsworker.Telemetry, got {type(telemetry).__name__}"
            )
        self.nc = nc
        self.js = nc.jetstream()
        self.services = Services(nc)
        #: pipelined JetStream publishes (one reply subscription per connection)
        self.pubacks = shared_pubacks(nc)
        self.telemetry = telemetry or Telemetry()
        self._bindings: KeyValue | None = None
        self.warn_no_worker = warn_no_worker
        #: (task type, group) -> (monotonic expiry, served?) of the listening check
        self._served: dict[tuple[str, str | None], tuple[float, bool | None]] = {}

    def _served_cached(self, task_type: str, group: str | None) -> tuple[bool, bool | None]:
        hit = self._served.get((task_type, group))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    async def _check_served(self, subject: str, task_type: str, group: str | None) -> bool | None:
        """Does a live worker serve ``subject`` (see :class:`NoWorkerWarning`)? None when
        that cannot be told (no permission to list consumers, a slow server)."""
        from ._dead import _listening

        found, value = self._served_cached(task_type, group)
        if found:
            return value
        try:
            served: bool | None = await asyncio.wait_for(
                _listening(self.nc, subject, task_type, group), LISTENING_TIMEOUT
            )
            ttl = LISTENING_TTL
        except (TimeoutError, nats.errors.Error, JSWorkerError):
            raise_if_cancelling()
            served, ttl = None, LISTENING_GIVE_UP
        self._served[(task_type, group)] = (time.monotonic() + ttl, served)
        return served

    def _warn_unserved(self, subject: str, stacklevel: int) -> None:
        if self.warn_no_worker:
            warnings.warn(no_worker_message(subject), NoWorkerWarning, stacklevel=stacklevel + 1)

    async def _sticky_route(
        self, task_type: str, run_id: str, mode: str | None, last: bool, subject: str
    ) -> tuple[str, dict[str, str]]:
        """Subject and extra headers of a task: a sticky one goes to its run's worker
        (docs/sticky-assignment.md); others are left as they are."""
        if mode is None:
            return subject, {}
        if self._bindings is None:
            self._bindings = await bindings_kv(self.js)
        routed = await route(self.js, self._bindings, task_type, run_id, mode, subject)
        return routed, sticky_headers(mode, subject, last)

    def _build(
        self,
        task_type: str,
        input: Any,
        *,
        group: str | None,
        run_id: str | None,
        step_id: str | None,
        metadata: Mapping[str, str] | None,
        key: str | None = None,
        trace: tuple[str, str] | None = None,
        sticky: str | None = None,
        last_step: bool = False,
    ) -> tuple[str, bytes, str, str, str]:
        n.validate_task_type(task_type)
        if key is not None:
            n.validate_key(key)
        if group is not None:
            n.validate_group(group)
        run_id = n.validate_run_id(run_id) if run_id is not None else n.new_run_id()
        step_id = n.validate_step_id(step_id) if step_id is not None else task_type
        tp, ts = trace if trace is not None else current_traceparent()
        task_id = n.new_task_id()
        value = w.to_json_value(input, "input")
        body = w.TaskPayload(
            task_id=task_id,
            run_id=run_id,
            step_id=step_id,
            iteration=0,
            attempt=1,
            input=value,
            metadata={str(k): str(v) for k, v in (metadata or {}).items()},
            traceparent=tp,
            tracestate=ts,
        ).encode()
        subject = n.task_subject(task_type, key if key is not None else run_id, group)
        extra = sticky_headers(sticky, subject, last_step) if sticky else None
        self._check_size(body, value, f"{run_id}.{step_id}.0", extra)
        return subject, body, run_id, step_id, task_id

    def _check_size(
        self, body: bytes, value: Any, msg_id: str, extra: Mapping[str, str] | None = None
    ) -> None:
        """Refuse a task the server would refuse: body plus headers over ``max_payload``.
        (nats-py checks the body only; the server drops the connection of a publisher
        that sends more, which the caller would see as a timeout.)"""
        limit = self.nc.max_payload
        hdrs = w.headers_size({"Nats-Msg-Id": msg_id, **(extra or {})})
        if not limit or len(body) + hdrs <= limit:
            return
        envelope = len(body) - len(w.dumps(value))
        raise PayloadError(
            f"task payload is {len(body)} bytes plus {hdrs} bytes of headers, over the "
            f"server's max_payload of {limit} bytes: the input (as JSON) can be at most "
            f"{max(0, limit - hdrs - envelope)} bytes here; store large inputs elsewhere "
            "(object store) and pass a reference"
        )

    async def submit(
        self,
        task_type: str,
        input: Any = None,
        *,
        group: str | None = None,
        run_id: str | None = None,
        step_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        stream: bool = False,
        key: str | None = None,
        sticky: str | None = None,
        last_step: bool = False,
    ) -> TaskHandle:
        """Submit one task. ``input`` is JSON bytes or any JSON-serialisable value.

        ``key`` is the partition key for partitioned handlers (tasks with one key run
        one at a time, in order); it defaults to the run id. It becomes the subject's
        last token, so it follows the same naming rules. ``run_id``, ``step_id`` (default:
        the task type) and ``key`` are subject tokens of at most 128 characters
        (docs/wire.md, "Limits").

        Raises ``InvalidNameError`` for bad names, ``PayloadError`` for input that is not
        JSON (``NaN`` and infinities included) or does not fit in the server's
        ``max_payload`` with its envelope and headers (the message gives the largest
        input that fits), ``NotProvisionedError`` when ``TASK_QUEUES`` is missing.
        ``stream=True`` subscribes to the task's partial results before publishing, so
        ``handle.stream()`` sees every chunk.

        ``sticky="soft" | "hard"`` routes the run's steps to the worker that ran its
        first sticky step (docs/sticky-assignment.md): soft falls back to any worker
        when that one is gone, hard waits for it and fails (kind
        ``sticky_worker_gone``) when it stays gone. ``last_step=True`` marks the run's
        last step: its terminal outcome removes the run's binding. Raises
        ``ConfigError`` for another ``sticky`` value and ``NotProvisionedError``
        without KV ``sticky_bindings``."""
        mode = validate_mode(sticky)
        producer = self.telemetry.start_producer(task_type, group)
        span, trace = producer if producer is not None else (None, None)
        try:
            handle = await self._submit(
                task_type,
                input,
                group,
                run_id,
                step_id,
                metadata,
                stream,
                key,
                trace,
                sticky=mode,
                last_step=last_step,
            )
        except BaseException as e:
            if span is not None:
                Telemetry.end_producer(span, error=e)
            raise
        if span is not None:
            Telemetry.end_producer(span, run_id=handle.run_id, subject=handle.subject)
        if handle.listening is False:
            self._warn_unserved(handle.subject, stacklevel=2)
        return handle

    async def _submit(
        self,
        task_type: str,
        input: Any,
        group: str | None,
        run_id: str | None,
        step_id: str | None,
        metadata: Mapping[str, str] | None,
        stream: bool,
        key: str | None,
        trace: tuple[str, str] | None = None,
        *,
        sticky: str | None = None,
        last_step: bool = False,
    ) -> TaskHandle:
        subject, body, run_id, step_id, task_id = self._build(
            task_type,
            input,
            group=group,
            run_id=run_id,
            step_id=step_id,
            metadata=metadata,
            key=key,
            trace=trace,
            sticky=sticky,
            last_step=last_step,
        )
        subject, extra = await self._sticky_route(task_type, run_id, sticky, last_step, subject)
        chunk_sub = None
        if stream:
            chunk_sub = await self.nc.subscribe(n.stream_subject(run_id, step_id))
        # is the task served? cached per type and group; a miss is looked up alongside
        # the publish (sticky tasks go to one worker's subject: not checked)
        listening: bool | None = None
        check: asyncio.Future[bool | None] | None = None
        if sticky is None:
            found, listening = self._served_cached(task_type, group)
            if not found:
                check = asyncio.ensure_future(self._check_served(subject, task_type, group))
        try:
            ack = await self.pubacks.request(
                subject, body, headers={"Nats-Msg-Id": f"{run_id}.{step_id}.0", **extra}
            )
            if check is not None:
                listening = await check
        except BaseException as e:
            if check is not None and not check.done():
                check.cancel()
                check.add_done_callback(_consume)
            if chunk_sub is not None:
                with contextlib.suppress(Exception):
                    await chunk_sub.unsubscribe()
            if isinstance(e, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
                raise NotProvisionedError(
                    f"no stream captures {subject}: run `jsworker kv setup` to create "
                    f"{n.TASK_STREAM}"
                ) from None
            if isinstance(e, nats.errors.TimeoutError):
                raise ServerError(f"publishing {subject} timed out") from None
            raise
        return TaskHandle(
            self,
            task_type,
            run_id,
            step_id,
            task_id,
            subject,
            bool(ack.duplicate),
            ack.seq,
            chunk_sub,
            listening,
        )

    async def _publish(self, subject: str, body: bytes, msg_id: str) -> PubAck:
        headers = {"Nats-Msg-Id": msg_id}
        return await _translate(subject, self.pubacks.request(subject, body, headers))

    async def cancel(self, run_id: str, reason: str = "") -> None:
        """Cancel every step of run ``run_id`` (needs KV ``signals``): queued tasks of the
        run never start, running ones are asked to stop."""
        await self.services.request_cancel(run_id, reason)

    async def submit_many(
        self, tasks: Iterable[TaskRequest], *, window: int = 256
    ) -> list[TaskHandle]:
        """Submit many tasks with up to ``window`` publishes in flight; returns handles in
        order. Every task is validated before anything is published. With tracing on,
        each task gets its own producer span."""
        built = []
        spans: list[Any] = []
        try:
            for t in tasks:
                mode = validate_mode(t.sticky)
                producer = self.telemetry.start_producer(t.task_type, t.group)
                if producer is not None:
                    spans.append(producer[0])
                b = self._build(
                    t.task_type,
                    t.input,
                    group=t.group,
                    run_id=t.run_id,
                    step_id=t.step_id,
                    key=t.key,
                    metadata=t.metadata,
                    trace=producer[1] if producer is not None else None,
                    sticky=mode,
                    last_step=t.last_step,
                )
                built.append((t, b, producer[0] if producer is not None else None))
        except BaseException as e:
            for span in spans:
                Telemetry.end_producer(span, error=e)
            raise
        # Pipelined: every publish goes out without waiting for the previous one's
        # PubAck; at most ``window`` are unanswered at a time. Handles (and producer
        # spans) are completed in order as the PubAcks come back.
        pending: collections.deque[asyncio.Future[PubAck]] = collections.deque()
        handles: list[TaskHandle] = []
        ended = [0]  # producer spans ended so far (in order)

        # sticky tasks go to their run's worker (docs/sticky-assignment.md)
        routes = [
            await self._sticky_route(t.task_type, b[2], validate_mode(t.sticky), t.last_step, b[0])
            for t, b, _ in built
        ]

        # is each (type, group) served? one cached check each, not one per task
        served: dict[tuple[str, str | None], bool | None] = {}
        for t, b, _ in built:
            if t.sticky is None and (t.task_type, t.group) not in served:
                served[(t.task_type, t.group)] = await self._check_served(
                    b[0], t.task_type, t.group
                )

        async def settle_oldest() -> None:
            t, (_, _, run_id, step_id, task_id), span = built[len(handles)]
            subject = routes[len(handles)][0]
            try:
                ack = await _translate(subject, pending.popleft())
            except BaseException as e:
                ended[0] += 1
                if span is not None:
                    Telemetry.end_producer(span, error=e)
                raise
            ended[0] += 1
            if span is not None:
                Telemetry.end_producer(span, run_id=run_id, subject=subject)
            handles.append(
                TaskHandle(
                    self,
                    t.task_type,
                    run_id,
                    step_id,
                    task_id,
                    subject,
                    ack.duplicate,
                    ack.seq,
                    listening=served.get((t.task_type, t.group)) if t.sticky is None else None,
                )
            )

        try:
            for (_, (_, body, run_id, step_id, _), _), (subject, extra) in zip(
                built, routes, strict=True
            ):
                if len(pending) >= window:
                    await settle_oldest()
                headers = {"Nats-Msg-Id": f"{run_id}.{step_id}.0", **extra}
                pending.append(
                    await _translate(subject, self.pubacks.publish(subject, body, headers))
                )
            while pending:
                await settle_oldest()
        except BaseException as e:
            for fut in pending:  # nobody awaits these any more
                fut.add_done_callback(_consume)
            for _, _, span in built[ended[0] :]:
                if span is not None:
                    Telemetry.end_producer(span, error=e)
            raise
        warned: set[tuple[str, str | None]] = set()
        for h, t in zip(handles, (t for t, _, _ in built), strict=True):
            if h.listening is False and (t.task_type, t.group) not in warned:
                warned.add((t.task_type, t.group))
                self._warn_unserved(h.subject, stacklevel=2)
        return handles

    async def run_events(
        self, run_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Every event on ``history.{run_id}`` from the first, then live ones. Stops when
        no event arrives for ``timeout`` seconds (``None``: never).

        Following (``timeout=None``), the subscription's consumer is looked up after
        every ``OUTCOME_CHECK`` seconds without an event (one API request). An ephemeral
        consumer can be lost with a cluster node and would then stay silent for good:
        if the server no longer has it, a new subscription carries on from the event
        after the last one yielded."""
        n.validate_token(run_id, "run id")
        last = 0  # stream sequence of the last event read
        sub = await self._history(run_id)
        try:
            while True:
                try:
                    msg = await sub.next_msg(
                        timeout=timeout if timeout is not None else OUTCOME_CHECK
                    )
                except nats.errors.TimeoutError:
                    if timeout is not None:
                        return
                    if not await _consumer_alive(sub):
                        try:
                            fresh = await self._history(run_id, after=last)
                        except nats.errors.Error:
                            continue  # e.g. a leader election: look again after a while
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub = fresh
                    continue
                finally:
                    raise_if_cancelling()  # a cancel next_msg swallowed (Python 3.11)
                with contextlib.suppress(Exception):
                    last = msg.metadata.sequence.stream
                with contextlib.suppress(ValueError):
                    yield json.loads(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _history(self, run_id: str, *, after: int = 0) -> Any:
        """An ordered push subscription to ``history.{run_id}``: from its first event, or
        from the first one stored after stream sequence ``after``."""
        start: dict[str, Any] = (
            {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1}
            if after
            else {"deliver_policy": DeliverPolicy.ALL}
        )
        try:
            return await self.js.subscribe(
                n.history_subject(run_id),
                ordered_consumer=True,
                stream=n.HISTORY_STREAM,
                config=ConsumerConfig(**start),
            )
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(
                f"stream {n.HISTORY_STREAM} does not exist: run `jsworker kv setup`"
            ) from None

    async def wait_outcome(
        self, run_id: str, step_id: str, *, timeout: float | None = 60.0
    ) -> dict[str, Any]:
        """The terminal event of a step (``step.completed``), or raise ``TaskFailed``."""

        async def _wait() -> dict[str, Any]:
            # One subscription, kept for the whole wait (run_events re-subscribes only
            # if the server lost its consumer); read again from the start after an error.
            while True:
                try:
                    async with contextlib.aclosing(self.run_events(run_id)) as events:
                        async for ev in events:
                            found = _outcome_of(ev, step_id)
                            if found is not None:
                                return found
                except nats.errors.Error:
                    # reconnecting or a JetStream API hiccup during failover: try again
                    await asyncio.sleep(0.5)

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise TaskTimeout(
                f"no outcome for {run_id}/{step_id} within {timeout:g}s; the task may still "
                "finish (check `jsworker task watch`)"
            ) from None

    async def send_signal(self, run_id: str, name: str, data: object = None) -> int:
        """Send signal ``name`` to run ``run_id`` (KV ``signals``)."""
        return await self.services.send_signal(run_id, name, data)


T = TypeVar("T")


async def _translate(subject: str, aw: Awaitable[T]) -> T:
    """A publish's errors as the client's: no stream -> NotProvisionedError, timeout ->
    ServerError."""
    try:
        return await aw
    except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
        raise NotProvisionedError(
            f"no stream captures {subject}: run `jsworker kv setup` to create {n.TASK_STREAM}"
        ) from None
    except nats.errors.TimeoutError:
        raise ServerError(f"publishing {subject} timed out") from None


async def _consumer_alive(sub: Any) -> bool:
    """True if the server still has the subscription's consumer; False if it does not,
    or cannot say (then subscribing again is the safe choice)."""
    try:
        await sub.consumer_info()
    except Exception:
        return False
    return True


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _outcome_of(ev: object, step_id: str) -> dict[str, Any] | None:
    """``ev`` (any decoded JSON: the history is written by other languages too) if it is
    the step's success; raise ``TaskFailed`` if it ends the step otherwise; ``None`` for
    any other event or a body that is not an event."""
    if not isinstance(ev, dict) or ev.get("step_id") != step_id:
        return None
    et = ev.get("type")
    p = ev.get("payload")
    p = p if isinstance(p, dict) else {}
    kind = p.get("kind")
    if et == w.STEP_COMPLETED:
        return ev
    if (
        et == w.STEP_FAILED
        and isinstance(kind, str)
        and kind in w.TERMINAL_KINDS | {"max_iterations"}
    ):
        raise TaskFailed(str(p.get("error", "")), kind, ev)
    if et == w.STEP_CANCELLED:
        raise TaskFailed(str(p.get("reason", "cancelled")), "cancelled", ev)
    return None
