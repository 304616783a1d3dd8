"""Sticky assignment: the later steps of a run go to the worker that ran its first
sticky step (docs/sticky-assignment.md, docs/wire.md "Sticky assignment").

* A sticky task carries the header ``Jsworker-Sticky: soft|hard``. The worker that
  starts one binds the run (KV ``sticky_bindings``, ``{run_id}`` -> its worker id).
* The client publishes a sticky task of a bound run on ``sticky.{type}.{worker}.{run}``
  (stream ``STICKY_TASKS``), with ``Jsworker-Task-Subject`` holding the subject it would
  have had otherwise (its *home* subject); an unbound one goes to its home subject.
* Each worker consumes its own sticky subjects with a consumer of its own per task type
  (:class:`StickyLane`, part of the handler's runtime), deleted when the handler stops.
* Every worker sweeps the sticky subjects of its task types (:meth:`StickyLane.sweep`):
  a *soft* task whose worker is gone (no fresh directory entry, or no consumer) or has
  not pulled it within ``soft_timeout`` is moved back to its home subject (the binding
  moves when it starts elsewhere); a *hard* task waits, and once its worker has been
  gone for ``hard_timeout`` it is moved home marked ``Jsworker-Sticky-Failed``, which
  makes the worker that takes it record a terminal failure of kind
  ``sticky_worker_gone``: it is never dropped silently.
* The binding is removed when the run ends: a terminal outcome of a step submitted with
  ``last_step=True``, or any terminal failure or cancellation of a sticky step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from . import _names as n
from ._errors import ConfigError, ConsumerConflictError, NotProvisionedError
from ._pull import PullLoop
from ._wire import STICKY_WORKER_GONE

if TYPE_CHECKING:
    from ._handler import HandlerRuntime

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
__all__ = ["STICKY_WORKER_GONE", "StickyLane", "StickySettings", "StickyTask"]

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


def sticky_filter(task_type: str, worker_id: str) -> str:
    return f"sticky.{task_type}.{worker_id}.>"


def sticky_consumer(task_type: str, worker_id: str) -> str:
    """``sticky__{worker_id}__{type}``: one consumer per worker and task type."""
    return f"sticky__{worker_id}__{task_type}"


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


# ------------------------------------------------------------ the lane
class StickyLane:
    """One handler's sticky side on one worker: the consumer of
    ``sticky.{type}.{this worker}.>`` and its pull loop (sharing the runtime's credits,
    leases and executor), and the sweep of every other worker's sticky subjects of
    this type. Started and deleted with its :class:`~jsworker._handler.HandlerRuntime`."""

    def __init__(self, rt: HandlerRuntime, settings: StickySettings) -> None:
        self.rt = rt
        self.settings = settings
        self.loop: PullLoop | None = None
        self.consumer = sticky_consumer(rt.task_type, rt.env.worker_id)
        self._sweeper: asyncio.Task[None] | None = None
        #: worker id -> when this worker first saw it gone (monotonic)
        self.gone_since: dict[str, float] = {}
        self.moved = 0
        self.failed = 0

    async def start(self) -> None:
        env = self.rt.env
        filt = sticky_filter(self.rt.task_type, env.worker_id)
        cfg = ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.rt.spec.ack_wait,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_waiting=512,
            inactive_threshold=INACTIVE_THRESHOLD,
            description=f"jsworker sticky: {self.rt.task_type} on {env.worker_id}",
        )
        try:
            await env.js.add_consumer(n.STICKY_STREAM, cfg)
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(
                f"stream {n.STICKY_STREAM} does not exist: run `jsworker kv setup`"
            ) from None
        except nats.js.errors.APIError as e:
            raise ConsumerConflictError(
                f"cannot create the sticky consumer {self.consumer!r} on {n.STICKY_STREAM} "
                f"(filter {filt!r}): {e.description}"
            ) from None
        self.loop = self.rt._pull_loop(
            n.STICKY_STREAM, self.consumer, self.rt._dispatch, expires=env.pull_expires
        )
        await self.loop.start()
        self._sweeper = env.supervisor.spawn(f"sticky-sweep:{self.rt.task_type}", self._sweep_loop)

    async def stop_pulling(self) -> None:
        if self.loop is not None:
            await self.loop.stop()

    async def stop(self) -> None:
        """Stop the sweep and delete this worker's sticky consumer (it is this
        worker's own: nothing else uses it)."""
        from ._aio import cancel_and_wait

        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        await self.stop_pulling()
        with contextlib.suppress(Exception):
            await self.rt.env.js.delete_consumer(n.STICKY_STREAM, self.consumer)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_every)
            await self.sweep()

    async def sweep(self) -> None:
        """Move or fail the sticky tasks of this type whose worker is gone or not
        pulling (see the module docstring). Several workers sweep at once: a move is
        published with a dedup id derived from the sticky message's sequence, and the
        message is then deleted, so a task is moved once."""
        from ._partitions import live_workers

        env = self.rt.env
        js = env.js
        t = self.rt.task_type
        try:
            info = await js.stream_info(n.STICKY_STREAM, subjects_filter=f"sticky.{t}.>")
        except nats.js.errors.NotFoundError:
            return
        subjects = info.state.subjects or {}
        by_worker: dict[str, list[str]] = {}
        for subj in subjects:
            parts = subj.split(".")
            if len(parts) == 4 and parts[2] != env.worker_id:
                by_worker.setdefault(parts[2], []).append(subj)
        for w in list(self.gone_since):
            if w not in by_worker:
                del self.gone_since[w]
        if not by_worker:
            return
        alive = await live_workers(js, env.liveness)
        now = time.monotonic()
        for worker, subjs in by_worker.items():
            delivered = await self._delivered_upto(worker)
            gone = worker not in alive or delivered is None
            if gone:
                since = self.gone_since.setdefault(worker, now)
            else:
                self.gone_since.pop(worker, None)
                since = now
            for subj in subjs:
                await self._sweep_subject(subj, gone, now - since, delivered or 0)

    async def _delivered_upto(self, worker: str) -> int | None:
        """The last stream sequence ``worker``'s consumer of this type delivered, or
        ``None`` when it has no such consumer."""
        try:
            ci = await self.rt.env.js.consumer_info(
                n.STICKY_STREAM, sticky_consumer(self.rt.task_type, worker)
            )
        except nats.js.errors.NotFoundError:
            return None
        return ci.delivered.stream_seq if ci.delivered and ci.delivered.stream_seq else 0

    async def _sweep_subject(self, subj: str, gone: bool, gone_for: float, delivered: int) -> None:
        js = self.rt.env.js
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
        js = self.rt.env.js
        home = home_subject(m.subject, headers)
        out = {k: v for k, v in headers.items() if not k.startswith("Nats-")}
        out[HOME_HEADER] = home
        out["Nats-Msg-Id"] = f"sticky-move.{m.seq}.{m.subject.split('.')[-1]}"[:250]
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
