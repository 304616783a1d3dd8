"""Sticky assignment: the later steps of a run go to the worker that ran its first
sticky step (docs/sticky-assignment.md, docs/wire.md "Sticky assignment").

* A sticky task carries the header ``Jsworker-Sticky: soft|hard``. The worker that
  starts one binds the run (KV ``sticky_bindings``, ``{run_id}`` -> its worker id).
* The client publishes a sticky task of a bound run on ``sticky.{type}.{worker}.{run}``
  (stream ``STICKY_TASKS``), with ``Jsworker-Task-Subject`` holding the subject it would
  have had otherwise (its *home* subject); an unbound one goes to its home subject.
* Each worker consumes its own sticky subjects, ``sticky.*.{worker}.>``, with a consumer
  of its own (:class:`StickyRuntime`, one of the worker's runtimes), deleted on stop.
* Every worker sweeps the other workers' sticky subjects (:meth:`StickyRuntime.sweep`):
  a *soft* task whose worker is gone (no sticky consumer; or a consumer with no
  activity whose worker does not answer its presence subject and has no fresh
  directory entry) or has not pulled it within ``soft_timeout`` is moved back to its
  home subject (the binding moves when it starts elsewhere); a *hard* task waits, and
  once its worker has been gone for ``hard_timeout`` it is moved home marked
  ``Jsworker-Sticky-Failed``, which makes the worker that takes it record a terminal
  failure of kind ``sticky_worker_gone``: it is never dropped silently.
* The binding is removed when the run ends: a terminal outcome of a step submitted with
  ``last_step=True``, or any terminal failure or cancellation of a sticky step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from . import _names as n
from ._aio import cancel_and_wait
from ._env import RuntimeEnv
from ._errors import ConfigError, NotProvisionedError
from ._handler import DEFAULT_ACK_WAIT, HandlerRuntime, HandlerSpec
from ._pull import Slots
from ._retry import RetryPolicy
from ._wire import STICKY_WORKER_GONE

log = logging.getLogger("jsworker.sticky")

#: ``soft`` or ``hard``: the task is sticky
STICKY_HEADER = "Jsworker-Sticky"
#: ``true``: the task is its run's last step; its terminal outcome removes the binding
LAST_HEADER = "Jsworker-Sticky-Last"
#: the subject the task has when it is not routed to a worker (``task.{type}...``)
HOME_HEADER = "Jsworker-Task-Subject"
#: set by a sweeper on a hard task whose worker is gone: record ``sticky_worker_gone``
FAILED_HEADER = "Jsworker-Sticky-Failed"
MODES = ("soft", "hard")
__all__ = ["STICKY_WORKER_GONE", "StickyRuntime", "StickySettings", "StickyTask"]

DEFAULT_SOFT_TIMEOUT = 10.0
DEFAULT_HARD_TIMEOUT = 300.0
#: STICKY_TASKS keeps a message 30 min: a hard task must fail well before that
MAX_HARD_TIMEOUT = 25 * 60.0
#: a sticky consumer the server has seen no pull on for this long is deleted by it
INACTIVE_THRESHOLD = 120.0


def validate_mode(mode: object) -> str | None:
    if mode is None or mode is False:
        return None
    if mode not in MODES:
        raise ConfigError(f"sticky must be 'soft', 'hard' or None, got {mode!r}")
    return str(mode)


def sticky_subject(task_type: str, worker_id: str, run_id: str) -> str:
    return f"sticky.{task_type}.{worker_id}.{run_id}"


def sticky_filter(worker_id: str) -> str:
    return f"sticky.*.{worker_id}.>"


def sticky_consumer(worker_id: str) -> str:
    """``sticky__{worker_id}``: each worker's own consumer of ``STICKY_TASKS``."""
    return f"sticky__{worker_id}"


def is_sticky_subject(subject: str) -> bool:
    return subject.startswith("sticky.")


@dataclass(frozen=True, slots=True)
class StickySettings:
    """``soft_timeout``: a soft task not pulled by its worker within this long (or whose
    worker is gone) runs elsewhere (default 10 s). ``hard_timeout``: a hard task fails
    (``sticky_worker_gone``) once its worker has been gone this long (default 5 min, at
    most 25 min: ``STICKY_TASKS`` keeps messages 30 min). ``check_every``: how often a
    worker sweeps the sticky subjects of its task types (default: a quarter of
    ``soft_timeout``, between 0.1 s and 5 s)."""

    soft_timeout: float = DEFAULT_SOFT_TIMEOUT
    hard_timeout: float = DEFAULT_HARD_TIMEOUT

    @property
    def check_every(self) -> float:
        return min(5.0, max(0.1, self.soft_timeout / 4))


# ------------------------------------------------------------- bindings
async def bindings_kv(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(n.STICKY_BINDINGS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.STICKY_BINDINGS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None


async def bound_worker(kv: KeyValue, run_id: str) -> str | None:
    """The worker id run ``run_id`` is bound to, or ``None``. A value that is not a
    valid worker id is ignored (the run is treated as unbound)."""
    try:
        entry = await kv.get(run_id)
    except nats.js.errors.KeyNotFoundError:
        return None
    try:
        return n.validate_token((entry.value or b"").decode(), "worker id")
    except (UnicodeDecodeError, Exception):
        return None


async def worker_present(js: JetStreamContext, worker_id: str) -> bool:
    """Whether ``worker_id`` has an entry in the worker directory (KV ``workers``)."""
    try:
        kv = await js.key_value(n.WORKERS_BUCKET)
        await kv.get(worker_id)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def route(
    js: JetStreamContext,
    bindings: KeyValue,
    task_type: str,
    run_id: str,
    mode: str,
    home: str,
) -> str:
    """The subject for a sticky task: its bound worker's sticky subject, or ``home``
    when the run is unbound, or (soft) when the bound worker has no directory entry.
    A hard task of a bound run always goes to its worker (it fails there if the
    worker stays gone)."""
    worker = await bound_worker(bindings, run_id)
    if worker is None:
        return home
    if mode == "soft" and not await worker_present(js, worker):
        return home
    return sticky_subject(task_type, worker, run_id)


def sticky_headers(mode: str, home: str, last: bool) -> dict[str, str]:
    h = {STICKY_HEADER: mode, HOME_HEADER: home}
    if last:
        h[LAST_HEADER] = "true"
    return h


def home_subject(msg_subject: str, headers: dict[str, str] | None) -> str:
    """The task subject of a message read from ``STICKY_TASKS`` (its
    ``Jsworker-Task-Subject`` header when that is a valid ``task.`` subject), else
    the subject itself."""
    if not is_sticky_subject(msg_subject):
        return msg_subject
    home = (headers or {}).get(HOME_HEADER, "")
    from ._wire import check_task_subject

    try:
        check_task_subject(home)
    except Exception:
        parts = msg_subject.split(".")
        # sticky.{type}.{worker}.{run}: without a usable header, the ungrouped subject
        return f"task.{parts[1]}.{parts[-1]}" if len(parts) >= 4 else msg_subject
    return home


async def worker_answers(env: RuntimeEnv, worker_id: str) -> bool:
    """Whether ``worker_id`` looks alive: it answers its presence subject
    (``jsworker.workers.{id}.ping``), or it is silent (stalled, cut off) but its
    directory entry was refreshed within the liveness interval. "No responders" (its
    connection is closed) counts as not alive."""
    from ._directory import probe

    state = await probe(env.nc, worker_id, 1.0)
    if state != "silent":
        return state == "alive"
    try:
        kv = await env.js.key_value(n.WORKERS_BUCKET)
        entry = await kv.get(worker_id)
        seen = datetime.fromisoformat(json.loads(entry.value or b"")["last_seen"]).timestamp()
    except nats.js.errors.NotFoundError:
        return False
    except (ValueError, KeyError, TypeError):
        return True  # an entry this code cannot read: count it as there
    return time.time() - seen <= env.liveness


# ------------------------------------------------------------ the runtime
async def _no_handler(ctx: object) -> None:  # pragma: no cover - never called
    raise AssertionError("the sticky runtime dispatches to the handlers' runtimes")


#: the sticky runtime's key among a worker's runtimes: never a valid task type
STICKY_KEY = "*sticky"
#: the sticky runtime's spec: a constant, so a live change never swaps or re-creates it
STICKY_SPEC = HandlerSpec(STICKY_KEY, _no_handler, True, DEFAULT_ACK_WAIT, RetryPolicy(), 1)


class StickyCredits(Slots):
    """The sticky pull loop's credits. It asks for messages only while the worker's pool
    has free credits, but takes a credit of the pool only when a message arrives, so an
    idle sticky consumer parks none of the worker's credits. A message that arrives
    when the pool has just been filled by others waits for a credit (leased, not
    running): at most one request's worth."""

    def __init__(self, pool: Slots) -> None:
        super().__init__(pool.size)
        self.pool = pool
        self._root = pool._root  # wake up on the worker pool's changes

    def available(self) -> int:
        return min(self.free, self.pool.available())

    def give(self, k: int = 1) -> None:
        if k > 0:
            self.free += k
            self.pool._root._changed.set()


class StickyRuntime(HandlerRuntime):
    """The worker's sticky side, one per worker, started with its first handler and
    drained with its last (like any runtime, by ``Worker._converge``):

    * one consumer of its own, ``sticky__{worker_id}``, filtering
      ``sticky.*.{worker_id}.>`` on ``STICKY_TASKS``; it asks for tasks only while the
      worker's pool has credits (:class:`StickyCredits`), and each task it delivers
      takes a credit of its handler's pool (and so of the worker's) before it runs on
      the runtime of its type (executor, leases, drain); a task of a type this worker
      does not handle (any more) goes back to its home subject;
    * the sweep of the other workers' sticky subjects (the module docstring).

    Its consumer is deleted when it stops, after the sticky tasks it started have
    settled (an ack to a deleted consumer would be lost)."""

    def __init__(self, env: RuntimeEnv, spec: HandlerSpec = STICKY_SPEC) -> None:
        super().__init__(env, spec)
        self.slots = StickyCredits(env.credits)
        self.settings = env.sticky
        self.consumer = sticky_consumer(env.worker_id)
        #: sticky tasks started here and still running on a handler's runtime
        self.running: dict[asyncio.Task[None], tuple[Msg, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._setup: asyncio.Task[None] | None = None
        self._moves: set[asyncio.Task[None]] = set()
        #: worker id -> when this worker first saw it gone (monotonic)
        self.gone_since: dict[str, float] = {}
        self.moved = 0
        self.failed = 0

    async def start(self) -> None:
        """Create the consumer and start pulling. When that fails (server busy,
        reconnecting) it is retried in the background under the supervisor, with its
        backoff, instead of failing the worker's handlers; a closed connection fails
        the worker as any loop's would. The worker starts this runtime before its
        handlers' (``Worker._wanted``)."""
        self._start_heartbeats()
        self._sweeper = self.env.supervisor.spawn("sticky-sweep", self._sweep_loop)
        try:
            await self._consume()
        except Exception as e:
            log.warning("sticky consumer not created yet (retrying): %s", e)
            self._setup = self.env.supervisor.spawn("sticky-consumer", self._consume)

    async def _consume(self) -> None:
        env = self.env
        filt = sticky_filter(env.worker_id)
        cfg = ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=DEFAULT_ACK_WAIT,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_waiting=512,
            inactive_threshold=INACTIVE_THRESHOLD,
            description=f"jsworker sticky tasks of {env.worker_id}",
        )
        try:
            await env.js.add_consumer(n.STICKY_STREAM, cfg)
        except nats.js.errors.APIError as e:
            # The handlers work without it; no sticky task can be published either
            # without the stream. Said loudly, counted in health, not retried in a loop.
            problem = (
                f"stream {n.STICKY_STREAM} does not exist (run `jsworker kv setup`)"
                if isinstance(e, nats.js.errors.NotFoundError)
                else f"consumer {self.consumer!r} (filter {filt!r}): {e.description}"
            )
            env.health.last_error = f"sticky assignment off: {problem}"
            log.error("sticky assignment is off on this worker: %s", problem)
            return
        if self.draining.is_set():
            return
        loop = self._pull_loop(
            n.STICKY_STREAM, self.consumer, self._dispatch, expires=env.pull_expires
        )
        self.loops.append(loop)
        await loop.start()

    def _dispatch(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        rt = self.env.runtime_of(parts[1]) if len(parts) == 4 else None
        if rt is None or rt.ordered or rt.draining.is_set():
            self.slots.give(1)
            task = asyncio.create_task(self._send_home(msg))
            self._moves.add(task)
            task.add_done_callback(self._moves.discard)
            return
        task = asyncio.create_task(self._run(rt, msg))
        self.running[task] = (msg, time.monotonic())
        task.add_done_callback(self._settled)

    async def _run(self, rt: HandlerRuntime, msg: Msg) -> None:
        """Run one sticky task on its handler's runtime, with a credit of that
        handler's pool (and so of the worker's): it waits for one, its lease renewed
        here meanwhile, so a worker never runs more than its concurrency."""
        await rt.slots.take(1)
        task = asyncio.current_task()
        assert task is not None
        rt.inflight[task] = (msg, time.monotonic())
        retried = _watch_nak(msg)
        try:
            await self.env.executor.execute(rt, msg)
        finally:
            rt.inflight.pop(task, None)
            rt.slots.give(1)
        await self._forget(msg, retried)

    async def _forget(self, msg: Msg, retried: list[bool]) -> None:
        """Delete a sticky task settled for good (acked or terminated, not nak'ed for a
        retry) from ``STICKY_TASKS``: that stream has limits retention (DagNats's setting,
        which DagNats's engine insists on), so an acknowledgement does not remove it,
        and the sweeper would otherwise take a finished task for one never pulled."""
        if not msg._ackd or retried:
            return
        try:
            await self.env.js.delete_msg(n.STICKY_STREAM, msg.metadata.sequence.stream)
        except nats.js.errors.NotFoundError:
            pass  # a work-queue stream removed it on the ack; or already deleted
        except Exception as e:
            log.warning("finished sticky task %s not deleted: %s", msg.subject, e)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self.slots.give(1)

    def held(self) -> list[tuple[Msg, float]]:
        # leases on the sticky consumer (AckWait 30 s) are renewed here, whatever the
        # handler's own ack_wait
        return list(self.running.values())

    async def _send_home(self, msg: Msg) -> None:
        """A sticky task this worker cannot run: publish it on its home subject (it
        binds to whoever runs it), then ack it here."""
        headers = dict(msg.headers or {})
        home = home_subject(msg.subject, headers)
        out = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        out[HOME_HEADER] = home
        out["Nats-Msg-Id"] = f"sticky-move.{msg.metadata.sequence.stream}"
        try:
            await self.env.js.publish(home, msg.data, headers=out)
            await msg.ack()
        except Exception as e:  # left unacked: redelivered after AckWait
            log.warning("sticky task %s not sent home: %s", msg.subject, e)
            return
        await self._forget(msg, [])

    async def drain(self, grace: float) -> None:
        self.draining.set()
        await cancel_and_wait(self._setup)
        await self.stop_pulling()
        if self.running:
            # the handlers' runtimes finish or hand back these within the grace period;
            # one still waiting for a credit then is cancelled (its message, unacked,
            # stays in STICKY_TASKS and is moved home by another worker's sweep)
            _, late = await asyncio.wait(list(self.running), timeout=grace + 5)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        if self._moves:
            await asyncio.wait(list(self._moves), timeout=5)
        await self.stop()

    async def stop(self) -> None:
        await cancel_and_wait(self._setup)
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        await super().stop()
        with contextlib.suppress(Exception):
            await self.env.js.delete_consumer(n.STICKY_STREAM, self.consumer)

    # ------------------------------------------------------------ sweeping
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_every)
            await self.sweep()

    async def sweep(self) -> None:
        """Move or fail the sticky tasks whose worker is gone or not pulling (see the
        module docstring). Several workers sweep at once: a move is published with a
        dedup id derived from the sticky message's sequence, and the message is then
        deleted, so a task is moved once."""
        env = self.env
        js = env.js
        try:
            info = await js.stream_info(n.STICKY_STREAM, subjects_filter="sticky.>")
        except nats.js.errors.NotFoundError:
            return
        by_worker: dict[str, list[str]] = {}
        for subj in info.state.subjects or {}:
            parts = subj.split(".")
            if len(parts) == 4 and parts[2] != env.worker_id:
                by_worker.setdefault(parts[2], []).append(subj)
        for w in list(self.gone_since):
            if w not in by_worker:
                del self.gone_since[w]
        if not by_worker:
            return
        now = time.monotonic()
        for worker, subjs in by_worker.items():
            delivered, active = await self._consumer_state(worker)
            gone = delivered is None or (not active and not await worker_answers(env, worker))
            if gone:
                since = self.gone_since.setdefault(worker, now)
            else:
                self.gone_since.pop(worker, None)
                since = now
            for subj in subjs:
                await self._sweep_subject(subj, gone, now - since, delivered or 0)

    async def _consumer_state(self, worker: str) -> tuple[int | None, bool]:
        """``worker``'s sticky consumer: the last stream sequence it delivered (``None``
        when there is no such consumer), and whether it is active (pull requests
        waiting, which the server drops at once when a connection closes, or a delivery
        or ack within ``soft_timeout``). An active consumer's worker is never gone,
        whether or not it answers its presence subject (another language's may not)."""
        try:
            ci = await self.env.js.consumer_info(n.STICKY_STREAM, sticky_consumer(worker))
        except nats.js.errors.NotFoundError:
            return None, False
        delivered = ci.delivered.stream_seq if ci.delivered and ci.delivered.stream_seq else 0
        if ci.num_waiting:
            return delivered, True
        window = self.settings.soft_timeout
        for seq in (ci.delivered, ci.ack_floor):
            last = seq.last_active if seq is not None else None
            if last is not None and time.time() - last.timestamp() < window:
                return delivered, True
        return delivered, False

    async def _sweep_subject(self, subj: str, gone: bool, gone_for: float, delivered: int) -> None:
        js = self.env.js
        seq = 1
        while True:
            try:
                m = await js.get_msg(n.STICKY_STREAM, seq=seq, subject=subj, next=True)
            except nats.js.errors.NotFoundError:
                return
            if m.seq is None:
                return
            seq = m.seq + 1
            headers: dict[str, str] = dict(m.headers or {})
            hard = headers.get(STICKY_HEADER) == "hard"
            if gone:
                if hard and gone_for < self.settings.hard_timeout:
                    continue
            else:
                if hard or m.seq <= delivered:
                    continue  # its worker is there and has taken it (or will)
                sent = m.time.timestamp() if m.time else time.time()
                if time.time() - sent < self.settings.soft_timeout:
                    continue
            reason = None
            if hard:
                reason = (
                    f"hard-sticky task: its worker {subj.split('.')[2]} was gone for longer "
                    f"than {self.settings.hard_timeout:g}s"
                )
            await self._move(m, headers, reason)

    async def _move(self, m: Any, headers: dict[str, str], failed: str | None) -> None:
        """Publish the sticky message ``m`` on its home subject (with ``failed`` as
        ``Jsworker-Sticky-Failed``), then delete it from ``STICKY_TASKS``."""
        js = self.env.js
        home = home_subject(m.subject, headers)
        out = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        out[HOME_HEADER] = home
        out["Nats-Msg-Id"] = f"sticky-move.{m.seq}"
        if failed:
            out[FAILED_HEADER] = failed
        await js.publish(home, m.data or b"", headers=out)
        with contextlib.suppress(nats.js.errors.Error):
            await js.delete_msg(n.STICKY_STREAM, m.seq)
        if failed:
            self.failed += 1
            log.warning("sticky task %s (seq %s): %s", m.subject, m.seq, failed)
        else:
            self.moved += 1
            log.info("soft-sticky task %s (seq %s) moved to %s", m.subject, m.seq, home)


def _watch_nak(msg: Msg) -> list[bool]:
    """A flag that becomes ``[True]`` when ``msg`` is nak'ed (handed back or retried)."""
    seen: list[bool] = []
    nak = msg.nak

    async def watched(*args: Any, **kwargs: Any) -> None:
        seen.append(True)
        await nak(*args, **kwargs)

    msg.nak = watched  # type: ignore[method-assign]
    return seen


# ------------------------------------------------------------ the gate
@dataclass(frozen=True, slots=True)
class StickyTask:
    """The sticky part of one delivered task (``None`` when it is not sticky)."""

    mode: str
    last: bool
    failed: str | None

    @classmethod
    def of(cls, msg: Msg) -> StickyTask | None:
        h = msg.headers
        if not h:
            return None
        mode = h.get(STICKY_HEADER)
        if mode not in MODES:
            return None
        return cls(str(mode), h.get(LAST_HEADER) == "true", h.get(FAILED_HEADER) or None)
