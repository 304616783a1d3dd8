"""Elastic partitions (orbit.go ``pcgroups`` compatible) and singleton handlers.

For each partitioned task type (and worker group) there is an elastic consumer group
``cg`` = the type's consumer name (see ``_names.consumer_name``):

* config in KV ``elastic-consumer-groups`` under ``TASK_QUEUES.{cg}`` (``_pcg_config``);
* a work-queue stream ``TASK_QUEUES-{cg}`` sourcing ``task.{type}[.{group}].*`` from
  ``TASK_QUEUES`` through ``{{Partition(n,1)}}``: the last subject token (the run id, or
  the ``key=`` given at submit) picks the partition;
* one consumer per member, named after the worker id, on priority group ``PCG`` with
  policy ``pinned_client``, filtering that member's partitions.

Unlike orbit.go, members come and go by themselves: a worker adds itself on start and
removes itself on stop (compare-and-swap on the KV entry, with jittered exponential
backoff on conflicts), and dead ``worker-…`` members are swept out, then their consumers
deleted so their partitions can be taken over. Every half second, the first
``worker-…`` member in sorted order that answers its presence subject judges all
members after it (one request each) and removes every dead one in one compare-and-swap,
so a fleet losing several workers at once rebalances once; the others only ask the
members before them, usually one request. A member is dead when

* its connection is gone (the server answers its presence subject with "no responders",
  see ``_directory.probe``) for ``GONE_GRACE`` seconds, longer than a reconnect; or it
  does not answer and its directory entry is older than the liveness interval (a lost
  machine); and, in both cases,
* its consumer shows no activity (waiting pull requests, deliveries or acks) within that
  window: the second check, so that a busy or stalled worker is never judged dead.

Members added by other tools (orbit.go, its ``cg`` CLI, ``jsworker partitions members
add``) are never removed automatically.

Per-key order: a member runs the tasks of one partition one at a time, in stream order,
and retries failures in place. When its partitions change it first stops pulling, hands
back (nak) what it has not started, lets what runs finish, and only then deletes its
consumer; the members gaining those partitions keep retrying to create theirs, which the
server refuses (error 10100, overlapping filters on a work-queue stream) until then. So a
partition is never consumed by two members at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig, StreamSource, SubjectTransform
from nats.js.kv import KeyValue

from . import _names as n
from ._aio import cancel_and_wait
from ._dagnats import STANDALONE_CONTRACT, Contract
from ._directory import ensure_presence, probe
from ._env import RuntimeEnv
from ._errors import NotProvisionedError, ServerError
from ._handler import HandlerRuntime, HandlerSpec
from ._pcg_config import (
    PRIORITY_GROUP,
    ElasticConfig,
    PartitionConfigError,
    PartitioningFilter,
    group_key,
    group_stream,
    member_partitions,
    partition_filters,
    transform_destination,
    validate,
)
from ._pull import PullLoop
from ._services import KV_DEL_OPS

log = logging.getLogger("jsworker.partitions")

_ERR_NOT_UNIQUE = 10100
_ERR_CONSUMER_EXISTS = 10148
PIN_HEADER = "Nats-Pin-Id"

#: a member whose connection is gone for this long (and whose consumer is idle) is dead;
#: longer than a client's reconnect (nats-py waits 2 s before retrying a server)
GONE_GRACE = 5.0
#: how long a presence request waits for an answer before the member counts as silent
PROBE_TIMEOUT = 1.0
#: a round of the sweeper, at most (shorter when the liveness interval is)
SWEEP_EVERY = 0.5
#: a change of the group's config is acted on once no further change came for this long
#: (at most ``SETTLE_MAX``): many members joining at once cause one rebalance, not many
SETTLE = 0.2
SETTLE_MAX = 1.0


def partition_filter(
    task_type: str, group: str | None, contract: Contract = STANDALONE_CONTRACT
) -> str:
    return contract.partition_filter(task_type, group)


def wanted_config(
    task_type: str,
    group: str | None,
    partitions: int,
    contract: Contract = STANDALONE_CONTRACT,
) -> ElasticConfig:
    """The group config this worker wants: standalone partitions by the key token; in
    DagNats mode exactly what DagNats's Go worker passes to orbit.go ``CreateElastic``
    (whole-subject partitioning, 1024 buffered messages), so members of both languages
    share one group."""
    return ElasticConfig(
        max_members=partitions,
        partitioning_filters=(
            PartitioningFilter(
                contract.partition_filter(task_type, group), contract.partitioning_wildcards
            ),
        ),
        max_buffered_msg=contract.max_buffered_msg,
    )


async def _kv(env: RuntimeEnv) -> KeyValue:
    try:
        return await env.js.key_value(n.PARTITION_GROUPS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.PARTITION_GROUPS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None


@dataclass
class CasStats:
    """Compare-and-swap counters of one member: writes that landed, and conflicts (each
    one a retry after a backoff)."""

    writes: int = 0
    conflicts: int = 0


def cas_backoff(conflicts: int) -> float:
    """Full-jitter exponential backoff after the n-th conflict in a row: uniform in
    [0, min(1 s, 10 ms x 2^n)], so members that collided spread out instead of
    colliding again in lock step."""
    return random.uniform(0, min(1.0, 0.01 * 2 ** min(conflicts, 10)))


async def cas_update(
    kv: KeyValue,
    key: str,
    mutate: Callable[[ElasticConfig], ElasticConfig | None],
    attempts: int = 100,
    stats: CasStats | None = None,
) -> ElasticConfig:
    """Read-modify-write the config with compare-and-swap; retried on conflicts (with
    jittered exponential backoff) so several workers starting at once never lose each
    other's update."""
    for attempt in range(attempts):
        entry = await kv.get(key)
        cfg = ElasticConfig.from_json(entry.value or b"", entry.revision or 0)
        new = mutate(cfg)
        if new is None or new.to_json() == cfg.to_json():
            return cfg
        try:
            rev = await kv.update(key, new.to_json(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            if stats is not None:
                stats.conflicts += 1
            await asyncio.sleep(cas_backoff(attempt))
            continue
        if stats is not None:
            stats.writes += 1
        return ElasticConfig.from_json(new.to_json(), rev)
    raise ServerError(f"could not update {key} after {attempts} compare-and-swap attempts")


class ElasticMember:
    """This worker as a member of one elastic consumer group."""

    def __init__(self, rt: PartitionedRuntime, group: str | None, partitions: int) -> None:
        self.rt = rt
        self.env = rt.env
        self.task_type = rt.spec.task_type
        self.group = group
        self.partitions = partitions
        self.contract = self.env.contract
        self.cg = self.contract.group_name(self.task_type, group)
        self.key = group_key(n.TASK_STREAM, self.cg)
        self.stream = group_stream(n.TASK_STREAM, self.cg)
        self.me = self.env.worker_id
        self.config: ElasticConfig | None = None
        self.filters: list[str] = []
        self.loop: PullLoop | None = None
        self.pin: str | None = None
        self.kv: KeyValue | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        #: our member consumer exists on the server (created and not yet deleted)
        self._have_consumer = False
        self.rebalances = 0
        self.cas = CasStats()
        #: members seen without a connection, since when (monotonic)
        self._gone_since: dict[str, float] = {}
        self._reconnects = 0

    @property
    def held_partitions(self) -> list[int]:
        return member_partitions(self.config, self.me) if self.config and self.loop else []

    # ------------------------------------------------------------- start-up
    async def start(self) -> None:
        self.kv = await _kv(self.env)
        await ensure_presence(self.env.nc, self.me)  # answer before joining
        await self._ensure_config()
        await self._ensure_stream()
        self.config = await cas_update(
            self.kv, self.key, lambda c: c.with_member(self.me), stats=self.cas
        )
        self._reconnects = self.env.nc.stats["reconnects"]
        spawn = self.env.supervisor.spawn
        self._tasks = [
            spawn(f"pcg-watch:{self.cg}", self._watch),
            spawn(f"pcg-reconcile:{self.cg}", self._reconcile_loop),
            spawn(f"pcg-sweep:{self.cg}", self._sweeper),
        ]

    async def _ensure_config(self) -> None:
        assert self.kv is not None
        want = wanted_config(self.task_type, self.group, self.partitions, self.contract)
        try:
            await self.kv.create(self.key, want.to_json())
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # exists (maybe written by orbit.go or another worker): check it
        entry = await self.kv.get(self.key)
        have = ElasticConfig.from_json(entry.value or b"")
        validate(have)
        if (
            have.max_members != want.max_members
            or have.max_buffered_msg != want.max_buffered_msg
            or (
                [
                    (p.filter, tuple(p.partitioning_wildcards or ()))
                    for p in have.partitioning_filters or ()
                ]
                != [
                    (p.filter, tuple(p.partitioning_wildcards or ()))
                    for p in want.partitioning_filters or ()
                ]
            )
        ):
            raise PartitionConfigError(
                f"elastic group {self.key} exists with {have.max_members} partitions and filters "
                f"{[p.filter for p in have.partitioning_filters or ()]}, but this worker wants "
                f"{want.max_members} on "
                f"{partition_filter(self.task_type, self.group, self.contract)}; delete "
                f"it (`jsworker partitions delete {self.task_type}`) once it is drained"
            )

    async def _ensure_stream(self) -> None:
        js = self.env.js
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        origin = await js.stream_info(n.TASK_STREAM)
        want = wanted_config(self.task_type, self.group, self.partitions, self.contract)
        pf = want.partitioning_filters
        assert pf is not None
        src = StreamSource(
            name=n.TASK_STREAM,
            subject_transforms=[
                SubjectTransform(
                    src=pf[0].filter, dest=transform_destination(pf[0], self.partitions)
                )
            ],
        )
        try:
            await js.add_stream(
                StreamConfig(
                    name=self.stream,
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=origin.config.storage,
                    num_replicas=origin.config.num_replicas,
                    discard=DiscardPolicy.NEW,
                    sources=[src],
                    max_msgs=want.max_buffered_msg or None,
                    # exactly orbit.go CreateElastic's settings (no description etc.), so
                    # a later CreateElastic for this group finds an identical stream
                    allow_direct=True,
                )
            )
        except nats.js.errors.APIError as e:
            if e.err_code == 10058:  # stream name in use (created concurrently)
                return
            raise ServerError(f"creating stream {self.stream} failed: {e.description}") from None

    # ------------------------------------------------------------- watching
    async def _watch(self) -> None:
        assert self.kv is not None
        watcher = await self.kv.watch(self.key)
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in KV_DEL_OPS:
                    log.error(
                        "elastic group %s was deleted; %s stops consuming it", self.key, self.me
                    )
                    self.config = None
                    self._changed.set()
                    continue
                try:
                    cfg = ElasticConfig.from_json(entry.value or b"", entry.revision or 0)
                    validate(cfg)
                except PartitionConfigError as e:
                    log.error("ignoring invalid config of %s: %s", self.key, e)
                    continue
                self.config = cfg
                if not cfg.is_member(self.me) and not cfg.member_mappings and not self._stopping:
                    # removed while alive (e.g. judged dead during a pause): join again
                    with contextlib.suppress(Exception):
                        await cas_update(
                            self.kv, self.key, lambda c: c.with_member(self.me), stats=self.cas
                        )
                self._changed.set()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _reconcile_loop(self) -> None:
        """Bring this member's consumer in line with the group's config. Supervised: if
        an API call fails, the loop is restarted and re-reads the wanted state, so one
        error never leaves the group without a consumer."""
        self._changed.set()  # (re)started: compare wanted and actual state afresh
        first = True
        while not self._stopping:
            await self._changed.wait()
            if first:  # start-up acts at once; later changes may come in bursts
                self._changed.clear()
                first = False
            else:
                await self._settle()
            if self._stopping:
                return
            desired = partition_filters(self.config, self.me) if self.config else []
            if desired == self.filters and (self.loop is not None or not desired):
                if not desired and self._have_consumer:
                    await self._drop_consumer()
                continue
            self.rebalances += 1
            self.env.telemetry.count_rebalance(self.task_type, self.group)
            await self._drop_consumer()
            while desired and not self._stopping:
                if await self._create_consumer(desired):
                    break
                # the previous owner still holds some partition: try again shortly,
                # unless the membership changed meanwhile
                try:
                    await asyncio.wait_for(self._changed.wait(), random.uniform(0.05, 0.15))
                except TimeoutError:
                    continue
                desired = partition_filters(self.config, self.me) if self.config else []
                self._changed.clear()
            self.filters = desired if self.loop is not None else []
            with contextlib.suppress(Exception):
                await self.env.on_membership_change()

    async def _settle(self) -> None:
        """Wait until the config stopped changing for ``SETTLE`` (at most ``SETTLE_MAX``):
        when dozens of members join at once, each acts on the final map once instead of
        deleting and re-creating its consumer for every intermediate one."""
        deadline = time.monotonic() + SETTLE_MAX
        self._changed.clear()
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), min(SETTLE, left))
            except TimeoutError:
                return
            self._changed.clear()

    # ------------------------------------------------------------ consumers
    async def _create_consumer(self, filters: list[str]) -> bool:
        aw = self.rt.spec.ack_wait
        cfg = {
            "name": self.me,
            "durable_name": self.me,
            "description": f"jsworker member of {self.cg}",
            "filter_subjects": filters,
            "ack_policy": "explicit",
            "ack_wait": int(aw * 1e9),
            "max_deliver": -1,
            "deliver_policy": "all",
            "max_ack_pending": -1,
            "max_waiting": 512,
            "priority_groups": [PRIORITY_GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": int(max(aw, 1.0) * 1e9),
            # a backstop only: the sweeper deletes a dead member's consumer itself
            "inactive_threshold": int(max(10 * aw, 30.0) * 1e9),
        }
        req = {"stream_name": self.stream, "config": cfg, "action": "create"}
        resp = await self._api(f"CONSUMER.CREATE.{self.stream}.{self.me}", req)
        err = resp.get("error")
        if err:
            code = err.get("err_code")
            if code == _ERR_NOT_UNIQUE:
                return False
            if code == _ERR_CONSUMER_EXISTS:
                await self._delete_consumer(self.me)
                return False
            raise ServerError(
                f"creating consumer {self.me} on {self.stream}: {err.get('description')}"
            )
        self._have_consumer = True
        self.pin = None
        expires = min(self.env.pull_expires, max(aw / 2, 1.0))
        self.loop = self.rt._pull_loop(
            self.stream,
            self.me,
            lambda msg: self.rt.dispatch_partitioned(self, msg),
            expires=expires,
            extra=self._pull_extra,
            on_status=self._on_status,
        )
        await self.loop.start()
        return True

    def _pull_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"group": PRIORITY_GROUP}
        if self.pin:
            extra["id"] = self.pin
        return extra

    def note_pin(self, msg: Msg) -> None:
        pin = (msg.headers or {}).get(PIN_HEADER)
        if pin:
            self.pin = pin

    async def _on_status(self, code: str, desc: str, msg: Msg) -> None:
        if code == "423":  # pinned to another client (or our pin expired): re-pin
            self.pin = None
        elif code == "409" and "Deleted" in desc:
            self.env.health.consumer_deleted += 1
            log.warning("member consumer %s on %s was deleted; rejoining", self.me, self.stream)
            self.filters = []
            self._have_consumer = False
            if self.loop is not None:
                self.rt.background(self.loop.stop())
                self.loop = None
            self._changed.set()

    async def _drop_consumer(self, grace: float | None = None) -> None:
        """Stop pulling, hand back waiting tasks, let running ones finish, then delete
        this member's consumer so its partitions can move without being consumed twice.
        Safe to call again after a failure: whatever is left (the consumer) is deleted."""
        if self.loop is not None:
            loop, self.loop = self.loop, None
            await loop.stop()
        self.rt.nak_waiting(self)
        grace = self.env.grace_period if grace is None else grace
        running = self.rt.running_tasks(self)
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            if late:
                log.warning(
                    "%d task(s) of %s still running after %gs; their partitions move "
                    "anyway and may run them again",
                    len(late),
                    self.cg,
                    grace,
                )
        # Acks are fire-and-forget publishes: a flush (PING/PONG) makes sure the server
        # has processed ours before the consumer goes. What it still counts as pending
        # then was delivered after we stopped listening and never ran; deleting the
        # consumer hands it to the next owner at once instead of after AckWait.
        if not self._have_consumer:
            return
        with contextlib.suppress(Exception):
            await self.env.nc.flush(timeout=5)
        await self._delete_consumer(self.me)
        self._have_consumer = False

    async def _delete_consumer(self, name: str) -> None:
        """Delete a member consumer; raises unless it is gone (deleted or never there)."""
        resp = await self._api(f"CONSUMER.DELETE.{self.stream}.{name}", None)
        err = resp.get("error")
        if err and err.get("err_code") != 10014:  # 10014: consumer not found
            raise ServerError(
                f"deleting consumer {name} on {self.stream}: {err.get('description')}"
            )

    async def _api(self, what: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await self.env.nc.request(f"$JS.API.{what}", data, timeout=5)
        except nats.errors.TimeoutError:
            return {"error": {"code": 408, "description": "JetStream API timeout"}}
        out: dict[str, Any] = json.loads(msg.data)
        return out

    # ---------------------------------------------------------- liveness
    async def _sweeper(self) -> None:
        every = min(SWEEP_EVERY, max(0.2, self.env.liveness / 3))
        while not self._stopping:
            await asyncio.sleep(every * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except (nats.errors.Error, nats.js.errors.Error, ServerError) as e:
                # expected through reconnects and leader elections: try at the next round
                log.debug("sweep of %s failed: %s", self.key, e)

    async def sweep(self) -> set[str]:
        """One round of the sweep: the first member (in sorted order) that answers its
        presence subject judges every member after it and removes the dead ones in one
        compare-and-swap, then deletes their consumers; every other member only checks
        that a member before it answers. Returns the members removed."""
        cfg = self.config
        if cfg is None or not cfg.members or self.kv is None:
            return set()
        reconnects = self.env.nc.stats["reconnects"]
        if reconnects != self._reconnects:
            # our own connection was interrupted: what we saw as gone may be us
            self._reconnects = reconnects
            self._gone_since.clear()
            return set()
        if self.me not in cfg.members:
            return set()
        before, after = sweep_plan(cfg.members, self.me)
        verdicts: dict[str, str] = {}
        for m in before:
            verdicts[m] = await self.judge(m)
            if verdicts[m] == "alive":
                return set()  # a live member before this one sweeps
        judged = await asyncio.gather(*(self.judge(m) for m in after))
        verdicts.update(zip(after, judged, strict=True))
        for m in set(self._gone_since) - set(verdicts):
            del self._gone_since[m]
        dead = {m for m, v in verdicts.items() if v == "dead"}
        if not dead:
            return set()
        log.info("removing dead members %s from %s", sorted(dead), self.key)
        self.config = await cas_update(
            self.kv, self.key, lambda c: c.without_members(dead), stats=self.cas
        )
        for m in dead:
            self._gone_since.pop(m, None)
            await self._delete_consumer(m)
        return dead

    async def judge(self, member: str) -> str:
        """``"alive"`` (it answered), ``"dead"`` (by both checks, see the module doc) or
        ``"pending"`` (not answering, not yet judged dead)."""
        state = await probe(self.env.nc, member, PROBE_TIMEOUT)
        if state == "alive":
            self._gone_since.pop(member, None)
            return "alive"
        if state == "gone":
            grace = min(GONE_GRACE, self.env.liveness)
            since = self._gone_since.setdefault(member, time.monotonic())
            if time.monotonic() - since < grace:
                return "pending"
            window = grace
        else:  # silent: stalled, or cut off; only its directory entry's age can tell
            self._gone_since.pop(member, None)
            if await directory_fresh(self.env.js, member, self.env.liveness):
                return "pending"
            window = self.env.liveness
        return "pending" if await self._consumer_active(member, window) else "dead"

    async def _consumer_active(self, member: str, window: float) -> bool:
        """A second opinion before removing a member: its consumer still has pull
        requests waiting, or delivered or was acked within ``window``. A busy or briefly
        stalled worker keeps its partitions; deleting the consumer of a live member could
        let two members run one key at once. The server drops a closed connection's pull
        requests at once."""
        info = await self._api(f"CONSUMER.INFO.{self.stream}.{member}", None)
        err = info.get("error")
        if err:
            # no consumer: nothing to fence; any other error (an API timeout under load)
            # tells nothing, so the member is kept until a later round can look
            return bool(err.get("err_code") != 10014)
        if info.get("num_waiting"):
            return True
        now = time.time()
        for part in ("delivered", "ack_floor"):
            stamp = (info.get(part) or {}).get("last_active")
            if stamp:
                try:
                    when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
                if now - when <= window:
                    return True
        return False

    # ------------------------------------------------------------ stopping
    async def leave(self) -> None:
        """Stop taking part: leave the membership first so the others start taking over,
        then stop pulling and hand back what has not started."""
        self._stopping = True
        self._changed.set()
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await cas_update(
                    self.kv, self.key, lambda c: c.without_members({self.me}), stats=self.cas
                )
        if self.loop is not None:
            await self.loop.stop()
        self.rt.nak_waiting(self)

    async def stop(self) -> None:
        await asyncio.gather(*(cancel_and_wait(t) for t in self._tasks))
        self._tasks = []
        await self._drop_consumer(grace=0)


def sweep_plan(members: list[str] | tuple[str, ...], me: str) -> tuple[list[str], list[str]]:
    """The ``worker-…`` members sorted before and after ``me`` (members added by other
    tools are never judged). ``me`` sweeps when none of the first list answers."""
    workers = sorted({m for m in members if m.startswith("worker-")} | {me})
    i = workers.index(me)
    return workers[:i], workers[i + 1 :]


async def directory_fresh(js: Any, worker_id: str, liveness: float) -> bool:
    """The worker's directory entry exists and was refreshed within ``liveness``
    seconds; an entry of a format this code cannot read counts as fresh."""
    kv = await js.key_value(n.WORKERS_BUCKET)
    try:
        entry = await kv.get(worker_id)
    except nats.js.errors.KeyNotFoundError:  # also deleted or expired
        return False
    try:
        seen = datetime.fromisoformat(json.loads(entry.value or b"")["last_seen"]).timestamp()
    except (ValueError, KeyError, TypeError):
        return True
    return time.time() - seen <= liveness


class PartitionedRuntime(HandlerRuntime):
    """A handler running as an elastic partitioned consumer group (one member per
    worker group), with per-partition ordering."""

    ordered = True

    def __init__(self, env: RuntimeEnv, spec: HandlerSpec) -> None:
        super().__init__(env, spec)
        self.partitions = spec.partitions
        self.members: list[ElasticMember] = []
        # Tasks with one ordering key run one at a time, in order. The key is the task's
        # partition key (its subject's last token); a singleton orders the whole
        # partition, so at most one of its tasks runs at a time.
        self.waiting: dict[tuple[str, int, str], collections.deque[tuple[Msg, float]]] = {}
        self.running: dict[tuple[str, int, str], asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for group in self.env.groups:
            m = ElasticMember(self, group, self.partitions)
            self.members.append(m)
            await m.start()
        self._start_heartbeats()

    def task_subject(self, msg: Msg) -> str:
        return msg.subject.split(".", 1)[1]

    def dispatch_partitioned(self, member: ElasticMember, msg: Msg) -> None:
        member.note_pin(msg)
        head, _, rest = msg.subject.partition(".")
        try:
            partition = int(head)
        except ValueError:
            partition = -1
        key = (member.cg, partition, "" if self.spec.singleton else rest.rsplit(".", 1)[-1])
        if key in self.running:
            self.waiting.setdefault(key, collections.deque()).append((msg, time.monotonic()))
            return
        self._start(key, msg)

    def _start(self, key: tuple[str, int, str], msg: Msg) -> None:
        task = asyncio.create_task(self.env.executor.execute(self, msg))
        self.inflight[task] = (msg, time.monotonic())
        self.running[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))

    def _finished(self, key: tuple[str, int, str], task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)
        self.slots.give(1)
        if self.running.get(key) is task:
            del self.running[key]
        queue = self.waiting.get(key)
        if queue:
            msg, _ = queue.popleft()
            if not queue:
                del self.waiting[key]
            self._start(key, msg)

    def held(self) -> list[tuple[Msg, float]]:
        out = list(self.inflight.values())
        for q in self.waiting.values():
            out.extend(q)
        return out

    def nak_waiting(self, member: ElasticMember) -> None:
        for key in [k for k in self.waiting if k[0] == member.cg]:
            for msg, _ in self.waiting.pop(key):
                self.background(_nak(msg))
                self.slots.give(1)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def running_tasks(self, member: ElasticMember) -> set[asyncio.Task[None]]:
        return {t for k, t in self.running.items() if k[0] == member.cg}

    def describe(self) -> dict[str, object]:
        return {m.cg: m.held_partitions for m in self.members}

    async def stop_pulling(self) -> None:
        await asyncio.gather(*(m.leave() for m in self.members))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))
        await super().stop()
        for t in list(self._background):
            with contextlib.suppress(Exception):
                await t


async def _nak(msg: Msg) -> None:
    with contextlib.suppress(Exception):
        await msg.nak()
