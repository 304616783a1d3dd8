"""The worker: owns the handler registry and the lifecycle.

Execution lives in :mod:`jsworker._executor`, consumers and pull loops in the handler
runtimes (:mod:`jsworker._handler`, :mod:`jsworker._partitions`), background loops under
one :class:`~jsworker._supervisor.Supervisor`. The registry is live: handlers can be
registered, replaced and removed while the worker runs, and every such change goes
through one path (:meth:`Worker._converge`), which compares the wanted handlers with the
running runtimes and swaps, adds or drains them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

from nats.aio.client import Client as NATS

from . import _dagnats as dn
from . import _names as n
from ._cancel import CancelWatcher
from ._dagnats_worker import DagnatsExecutor, RunWatcher
from ._directory import Directory
from ._duration import Duration, seconds
from ._env import RuntimeEnv
from ._errors import ConfigError, LifecycleError, WorkerFailedError
from ._executor import Executor
from ._gate import Gate
from ._handler import (
    DEFAULT_ACK_WAIT,
    MAX_PARTITIONS,
    HandlerRuntime,
    HandlerSpec,
    make_spec,
    validate_partitions,
)
from ._outcomes import OutcomeRecorder
from ._partitions import PartitionedRuntime
from ._provision import require_stream
from ._pull import Slots
from ._ratelimit import DEFAULT_HOLD, Limiter
from ._retry import RetryPolicy
from ._services import Services
from ._stats import WorkerHealth, WorkerStats
from ._sticky import (
    DEFAULT_HARD_TIMEOUT,
    DEFAULT_SOFT_TIMEOUT,
    MAX_HARD_TIMEOUT,
    STICKY_KEY,
    STICKY_SPEC,
    StickyRuntime,
    StickySettings,
)
from ._supervisor import Supervisor
from ._telemetry import Telemetry

log = logging.getLogger("jsworker.worker")
F = TypeVar("F", bound=Callable[..., Any])
HANDLER_OPTIONS = frozenset(
    {
        "ack_wait",
        "retry",
        "max_iterations",
        "concurrency",
        "partitions",
        "singleton",
        "rate_limit",
        "key_rate_limit",
    }
)

__all__ = ["MAX_PARTITIONS", "Worker"]


class Worker:
    """Runs task handlers on NATS JetStream.

    Args:
        nc: a connected ``nats.aio.client.Client`` (``None`` raises ``ConfigError``).
        telemetry: a :class:`Telemetry`; ``None`` (default) means no-op.
        groups: worker groups to serve (default: all). With ``("gpu",)`` the worker
            consumes ``task.{type}.gpu.>`` only. Empty names are refused; passing an
            explicitly empty list is refused too (omit it for all groups).
        partitions: default elastic partitions 1-256 for handlers that do not set their
            own ``partitions=`` (orbit.go ``pcgroups`` compatible, rebalanced across live
            workers, per-key order); 0 (default) is one shared consumer per task type
            and group.
        concurrency: the worker's pool of execution credits (default 64): at most this
            many tasks are leased at once across all handlers, and so at most this many
            run. Each handler may cap itself lower with ``concurrency=``.
        ack_wait: default lease per delivery (default 30 s); per handler ``ack_wait=``.
        retry: default :class:`RetryPolicy` (5 s fixed, 10 attempts).
        max_iterations: default bound for ``continue_`` (100).
        grace_period: how long ``stop()`` (and removing a handler) lets in-flight tasks
            finish (default 10 s, must be > 0); what is still running then is nak'ed for
            immediate redelivery.
        batch: most messages one pull request asks for (default 256).
        pull_expires: how long one pull request waits on the server (default 5 s).
        worker_id: default ``worker-{16 hex}``.
        heartbeat_interval: how often the worker directory entry is refreshed (default
            30 s). It bounds failover only for a member that is stalled or cut off
            without its connection closing (a lost machine): its partitions move once
            its entry is older than 3x this (at most 60 s, the bucket TTL). A member
            whose process died is found by its closed connection within about 7 s
            whatever this is (see docs/partitions.md, "Failover").
        sticky_soft_timeout: a soft-sticky task that its bound worker has not pulled
            within this long, or whose worker is gone, runs on another worker (default
            10 s; docs/sticky-assignment.md).
        sticky_hard_timeout: a hard-sticky task whose bound worker has been gone this
            long fails with kind ``sticky_worker_gone`` (default 5 min, at most 25 min).
        rate_limit_hold: a task over its rate limit whose next token is due within this
            long is held (its lease renewed) instead of nak'ed (default 2 s;
            docs/rate-limiting.md).
        engine: ``"standalone"`` (jsworker's own contract: worker-owned retries, dead
            letters, ``continue_``), ``"dagnats"`` (a DagNats engine drives the worker:
            docs/dagnats.md) or ``"auto"``: DagNats mode when the server has DagNats's
            ``SLEEP_TIMERS`` stream or ``workflow_runs`` bucket, standalone otherwise.
            Default: ``$JSWORKER_ENGINE``, else ``auto``. :attr:`engine` says which was
            chosen once the worker started.

    Handlers may be registered before or after :meth:`start`; on a running worker a
    registration goes live at once (see :meth:`handle`). ``start`` with no handlers is
    allowed (the seed's worker panics there; a live worker gains handlers later).
    ``stop`` is idempotent and safe before ``start``.
    """

    def __init__(
        self,
        nc: NATS | None,
        telemetry: Telemetry | None = None,
        *,
        groups: tuple[str, ...] | list[str] | None = None,
        partitions: int = 0,
        concurrency: int = 64,
        ack_wait: Duration = DEFAULT_ACK_WAIT,
        retry: RetryPolicy | None = None,
        max_iterations: int = 100,
        grace_period: Duration = 10.0,
        batch: int = 256,
        pull_expires: Duration = 5.0,
        worker_id: str | None = None,
        heartbeat_interval: Duration = 30.0,
        sticky_soft_timeout: Duration = DEFAULT_SOFT_TIMEOUT,
        sticky_hard_timeout: Duration = DEFAULT_HARD_TIMEOUT,
        rate_limit_hold: Duration = DEFAULT_HOLD,
        engine: str | None = None,
    ) -> None:
        if nc is None:
            raise ConfigError("Worker needs a connected NATS client (nc is None)")
        if groups is not None:
            if isinstance(groups, str):
                raise ConfigError("groups must be a list of names, not a single string")
            groups = tuple(groups)
            if not groups:
                raise ConfigError("groups must name at least one group (omit it for all groups)")
            for g in groups:
                n.validate_group(g)
            if len(set(groups)) != len(groups):
                raise ConfigError(f"groups has duplicates: {list(groups)}")
        validate_partitions(partitions)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"batch must be an int >= 1, got {batch!r}")
        self.nc: NATS = nc
        try:
            self.js = nc.jetstream()
        except Exception as e:  # pragma: no cover - nats-py does not fail here today
            raise ConfigError(f"JetStream could not be initialised: {e}") from e
        if telemetry is not None and not isinstance(telemetry, Telemetry):
            raise ConfigError(f"telemetry must be a jsworker.Telemetry, got {telemetry!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a jsworker.RetryPolicy, got {retry!r}")
        if (
            not isinstance(max_iterations, int)
            or isinstance(max_iterations, bool)
            or max_iterations < 1
        ):
            raise ConfigError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
        self.telemetry = telemetry or Telemetry()
        self.groups: tuple[str, ...] = groups or ()
        self.partitions = partitions
        self.concurrency = concurrency
        self.ack_wait = seconds(ack_wait, name="ack_wait", minimum=0.5)
        self.retry = (retry or RetryPolicy()).validated()
        self.max_iterations = max_iterations
        self.grace_period = seconds(grace_period, name="grace_period")
        self.batch = min(batch, concurrency)
        self.pull_expires = seconds(pull_expires, name="pull_expires", minimum=0.1, maximum=60)
        self.worker_id = n.new_worker_id() if worker_id is None else n.validate_worker_id(worker_id)
        self.heartbeat_interval = seconds(
            heartbeat_interval, name="heartbeat_interval", minimum=0.05, maximum=30.0
        )
        # a member that does not answer its presence subject and whose directory entry was
        # not refreshed for this long is dead; never more than the directory bucket's 60 s
        # TTL, after which the entry is gone anyway
        self.liveness = min(60.0, 3 * self.heartbeat_interval)
        self.sticky = StickySettings(
            seconds(sticky_soft_timeout, name="sticky_soft_timeout", minimum=0.1),
            seconds(
                sticky_hard_timeout,
                name="sticky_hard_timeout",
                minimum=0.1,
                maximum=MAX_HARD_TIMEOUT,
            ),
        )
        self.rate_limit_hold = seconds(
            rate_limit_hold, name="rate_limit_hold", allow_zero=True, maximum=60.0
        )
        #: the engine asked for; :attr:`engine` is the one in use (known after start)
        self.engine_setting = dn.engine_setting(engine)
        self.engine = self.engine_setting
        self.stats = WorkerStats()
        self.health = WorkerHealth()
        self.services = Services(nc)
        self.recorder = OutcomeRecorder(
            nc, self.worker_id, self.stats, self.telemetry, self.services
        )
        self._specs: dict[str, HandlerSpec] = {}  # wanted
        self._runtimes: dict[str, HandlerRuntime] = {}  # running
        self._state = "new"  # new -> running -> stopping -> stopped
        self._syncing = 0  # callers waiting in sync()
        self._stopped = asyncio.Event()
        self._supervisor: Supervisor | None = None
        self._executor: Executor | None = None
        self._limiter: Limiter | None = None
        self._env: RuntimeEnv | None = None
        self._cancels: CancelWatcher | None = None
        self._runs: RunWatcher | None = None
        self._directory: Directory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._converging: asyncio.Task[None] | None = None
        self._converge_lock = asyncio.Lock()
        self._errors: list[BaseException] = []

    # ---------------------------------------------------------- registration
    @overload
    def handle(self, task_type: str, fn: F, **options: Any) -> F: ...
    @overload
    def handle(self, task_type: str, fn: None = None, **options: Any) -> Callable[[F], F]: ...

    def handle(self, task_type: str, fn: F | None = None, **options: Any) -> F | Callable[[F], F]:
        """Register ``fn`` for ``task_type`` (also usable as ``@worker.handle("type")``).

        Options: ``ack_wait`` (seconds/timedelta), ``retry`` (:class:`RetryPolicy`),
        ``max_iterations`` (int), ``concurrency`` (int: most tasks of this type leased
        at once), ``partitions`` (0-256, default the worker's ``partitions``),
        ``singleton`` (bool; see :meth:`handle_singleton`).

        Registering a type again replaces its handler. On a running worker:

        * a new type goes live at once: its consumer is created (or its elastic group
          joined) in the background; ``await worker.sync()`` waits for it and raises
          what went wrong;
        * the same type with the same consumer shape swaps the code before this call
          returns: the next task runs the new function, tasks already running finish
          on the old one, no consumer is re-created and no partition moves;
        * a change of ``partitions``, ``singleton`` or ``ack_wait`` re-creates the
          handler: it is drained as by :meth:`remove_handler`, then started again.

        Raises ``ConfigError`` for a bad name or option (at this call, also on a
        running worker) and :class:`LifecycleError` once the worker is stopping.
        """
        if fn is None:
            n.validate_task_type(task_type)

            def deco(f: F) -> F:
                self.handle(task_type, f, **options)
                return f

            return deco
        self._register(task_type, fn, **options)
        return fn

    def handle_singleton(self, task_type: str, fn: F | None = None, **options: Any) -> Any:
        """Register a handler of which at most one execution runs at a time across all
        workers: a one-partition elastic consumer group for this type only (other
        handlers keep their mode). Usable as a decorator; options as :meth:`handle`."""
        return self.handle(task_type, fn, singleton=True, **options)

    def _register(self, task_type: str, fn: Callable[..., Any], **options: Any) -> None:
        if self._state in ("stopping", "stopped"):
            raise LifecycleError(f"cannot register {task_type!r}: the worker is {self._state}")
        unknown = set(options) - HANDLER_OPTIONS
        if unknown:
            raise ConfigError(f"unknown handler option(s): {sorted(unknown)}")
        singleton = options.get("singleton", False)
        if not isinstance(singleton, bool):
            raise ConfigError(f"singleton must be True or False, got {singleton!r}")
        spec = make_spec(
            task_type,
            fn,
            ack_wait=options.get("ack_wait"),
            retry=options.get("retry"),
            max_iterations=options.get("max_iterations", self.max_iterations),
            default_ack_wait=self.ack_wait,
            default_retry=self.retry,
            singleton=singleton,
            concurrency=options.get("concurrency"),
            partitions=options.get("partitions", self.partitions),
            rate_limit=options.get("rate_limit"),
            key_rate_limit=options.get("key_rate_limit"),
        )
        old = self._specs.get(task_type)
        if old is not None:
            spec = spec.replacing(old)
            log.info("handler %s replaced (version %d)", task_type, spec.version)
        self._specs[task_type] = spec
        self._converge()

    async def remove_handler(self, task_type: str, *, grace_period: Duration | None = None) -> None:
        """Stop handling ``task_type``: stop pulling, let its running tasks finish within
        the grace period (default: the worker's), hand back (nak) what has not started,
        and leave its elastic groups, whose remaining members take the partitions over
        as on a clean stop. The shared consumer of a non-partitioned type stays (other
        workers use it). Raises ``ConfigError`` when no such handler is registered."""
        if task_type not in self._specs:
            raise ConfigError(f"no handler for {task_type!r} is registered")
        grace = (
            None
            if grace_period is None
            else seconds(grace_period, name="grace_period", allow_zero=True)
        )
        del self._specs[task_type]
        if self._state == "running":
            rt = self._runtimes.get(task_type)
            if rt is not None and grace is not None:
                rt.drain_grace = grace
            self._converge()
            await self.sync()

    async def sync(self) -> None:
        """Wait until the running handlers match the registered ones and no execution
        of a replaced handler's old code is still running; then raise the first error
        that a live change met since the last call (consumer creation refused, stream
        or bucket missing, ...). A handler whose start failed is unregistered again."""
        self._syncing += 1  # a start error now reaches a caller: it is not logged too
        try:
            while True:
                task = self._converging
                if task is not None:
                    await asyncio.shield(task)
                if self._executor is not None:
                    for t, spec in list(self._specs.items()):
                        await self._executor.wait_versions_gone(t, spec.version)
                if self._converging is None or self._converging.done():
                    break
        finally:
            self._syncing -= 1
        if self._errors:
            first, self._errors = self._errors[0], []
            raise first

    @property
    def task_types(self) -> list[str]:
        return sorted(self._specs)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def in_flight(self) -> int:
        return sum(len(r.inflight) for r in self._runtimes.values())

    def handler_info(self) -> list[dict[str, Any]]:
        """One entry per registered handler (no I/O; for status displays): task type,
        function (qualified name), version, partitions, singleton, groups, partitions
        held by elastic group, tasks in flight, and whether it is live."""
        out = []
        for t, spec in sorted(self._specs.items()):
            rt = self._runtimes.get(t)
            out.append(
                {
                    "task_type": t,
                    "function": getattr(spec.fn, "__qualname__", repr(spec.fn)),
                    "version": spec.version,
                    "partitions": spec.partitions,
                    "singleton": spec.singleton,
                    "groups": list(self.groups),
                    "held": rt.describe() if rt is not None else {},
                    "in_flight": len(rt.inflight) if rt is not None else 0,
                    "live": rt is not None and rt.spec is spec,
                }
            )
        return out

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Check streams, bind optional buckets, register in the directory, start the
        handlers registered so far. Raises :class:`LifecycleError` when called twice,
        ``NotProvisionedError`` when streams/buckets are missing, and what starting a
        handler raised (the worker is stopped again then)."""
        if self._state != "new":
            raise LifecycleError(f"start() called on a worker that is {self._state}")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        try:
            if self.engine_setting == dn.AUTO:
                self.engine = await detect_engine(self.js)
            dagnats = self.engine == dn.DAGNATS
            if dagnats:
                await check_dagnats_streams(self.js)
            else:
                await require_stream(self.js, n.TASK_STREAM)
                await require_stream(self.js, n.HISTORY_STREAM)
                await require_stream(self.js, n.DEAD_LETTER_STREAM)
            self.services.raw = dagnats
            await self.services.bind_optional()
            sup = self._supervisor = Supervisor(self.nc, self.health)
            executor: Executor
            if dagnats:
                # the engine owns retries, rate limits, sticky routing and cancellation
                executor = self._executor = DagnatsExecutor(
                    self.recorder, self.services, self.stats, self.telemetry, lambda r: None
                )
                runs = self._runs = RunWatcher(self.js, sup.spawn, executor.on_cancel)
                executor.runs = runs
                await runs.start()
            else:
                self._cancels = CancelWatcher(self.services.signals, lambda r, why: None, sup.spawn)
                self._limiter = Limiter(self.js, hold=self.rate_limit_hold)
                gate = Gate(self.js, self.worker_id, self._limiter, self.stats)
                executor = self._executor = Executor(
                    self.recorder,
                    self.services,
                    self.stats,
                    self.telemetry,
                    self._cancels.reason,
                    gate,
                )
                self._cancels.on_cancel = executor.on_cancel
                await self._cancels.start()
            log.info("worker %s: %s mode", self.worker_id, self.engine)
            self._env = RuntimeEnv(
                nc=self.nc,
                js=self.js,
                worker_id=self.worker_id,
                groups=self.groups or (None,),
                batch=self.batch,
                pull_expires=self.pull_expires,
                grace_period=self.grace_period,
                liveness=self.liveness,
                credits=Slots(self.concurrency),
                health=self.health,
                supervisor=sup,
                executor=executor,
                on_membership_change=self._refresh_directory,
                telemetry=self.telemetry,
                sticky=self.sticky,
                runtime_of=self._handler_runtime,
                contract=dn.DAGNATS_CONTRACT if dagnats else dn.STANDALONE_CONTRACT,
            )
            self._directory = Directory(
                self.nc, self.worker_id, self._describe, sup.spawn, self.heartbeat_interval
            )
            await self._directory.start()
            sup.watch_connection()
            self._state = "running"
            self._converge()
            await self.sync()
        except BaseException:
            await self.stop()
            raise

    def _runtime_for(self, spec: HandlerSpec) -> HandlerRuntime:
        assert self._env is not None
        if spec is STICKY_SPEC:
            return StickyRuntime(self._env)
        if spec.partitions:
            return PartitionedRuntime(self._env, spec)
        return HandlerRuntime(self._env, spec)

    def _handler_runtime(self, task_type: str) -> HandlerRuntime | None:
        return None if task_type == STICKY_KEY else self._runtimes.get(task_type)

    def _wanted(self) -> dict[str, HandlerSpec]:
        """The runtimes this worker should run: one per registered handler, plus the
        sticky runtime (this worker's sticky consumer and sweep) while it has any,
        first, so its consumer exists before the handlers pull."""
        if not self._specs or self.engine == dn.DAGNATS:
            return self._specs  # DagNats routes sticky runs itself
        return {STICKY_KEY: STICKY_SPEC, **self._specs}

    def _describe(self) -> dict[str, Any]:
        held: dict[str, object] = {}
        for rt in self._runtimes.values():
            held.update(rt.describe())
        return {
            "task_types": self.task_types,
            "groups": list(self.groups),
            "partitions": held,
            # DagNats's WorkerRegistration fields, and the mode this worker runs in
            "transport": "nats",
            "max_tasks": self.concurrency,
            "engine": self.engine,
        }

    async def _refresh_directory(self) -> None:
        if self._directory is not None:
            await self._directory.refresh()

    # ----------------------------------------------------- the one live path
    def _converge(self) -> None:
        """Bring the running runtimes in line with the registered handlers.

        Code swaps happen here and now (no I/O). Adds, drains and re-creates need the
        server: they are done one at a time by a background task, which ``sync()``
        waits for."""
        if self._state != "running":
            return
        for t, spec in self._specs.items():
            rt = self._runtimes.get(t)
            if (
                rt is not None
                and rt.spec is not spec
                and rt.spec.needs_new_consumer == spec.needs_new_consumer
            ):
                rt.swap(spec)
        if self._pending_change() is not None and (
            self._converging is None or self._converging.done()
        ):
            assert self._loop is not None
            self._converging = self._loop.create_task(self._apply_changes(), name="jsworker:live")

    def _pending_change(self) -> tuple[str, str] | None:
        """The next change that needs I/O: ``("drain" | "start", task_type)``."""
        wanted = self._wanted()
        for t, rt in self._runtimes.items():
            spec = wanted.get(t)
            if spec is None or spec.needs_new_consumer != rt.spec.needs_new_consumer:
                return ("drain", t)
        for t in wanted:
            if t not in self._runtimes:
                return ("start", t)
        return None

    async def _apply_changes(self) -> None:
        async with self._converge_lock:
            while self._state == "running":
                change = self._pending_change()
                if change is None:
                    return
                what, t = change
                if what == "drain":
                    rt = self._runtimes[t]
                    await rt.drain(
                        rt.drain_grace if rt.drain_grace is not None else self.grace_period
                    )
                    del self._runtimes[t]
                    log.info("handler %s removed from this worker", t)
                else:
                    await self._start_runtime(self._wanted()[t])
                await self._refresh_quietly()
                self._converge()  # swaps registered meanwhile

    async def _start_runtime(self, spec: HandlerSpec) -> None:
        rt = self._runtime_for(spec)
        self._runtimes[spec.task_type] = rt
        try:
            if self.engine == dn.DAGNATS and (spec.rate_limit or spec.key_rate_limit):
                raise ConfigError(
                    f"handler {spec.task_type!r}: rate limits are the engine's in DagNats "
                    "mode (declare rate_limit on the workflow step), not the worker's"
                )
            if (spec.rate_limit or spec.key_rate_limit) and self._limiter is not None:
                await self._limiter.bind()  # NotProvisionedError without KV rate_limits
            await rt.start()
        except Exception as e:
            # a failed start must not leave half a runtime (a joined group, a loop)
            del self._runtimes[spec.task_type]
            await rt.drain(0)
            if self._specs.get(spec.task_type) is spec:
                del self._specs[spec.task_type]
            # raised by the sync() a caller awaits (start, handle in a session); logged
            # only when nobody waits for it (a change converging in the background)
            (log.debug if self._syncing else log.error)(
                "handler %s could not start: %s", spec.task_type, e
            )
            self._errors.append(e)

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh_directory()
        except Exception as e:  # the directory loop retries; the change itself is done
            log.warning("directory refresh after a handler change failed: %s", e)

    async def run(self) -> None:
        """Start the worker if needed, then wait until it is stopped. Raises
        :class:`WorkerFailedError` (after stopping the worker) when it cannot go on: a
        background loop failed for good, or its NATS connection was closed."""
        if self._state == "new":
            await self.start()
        sup = self._supervisor
        if sup is None:
            await self._stopped.wait()
            return
        failed = asyncio.ensure_future(sup.wait_failed())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            stopped.cancel()
        if sup.failed:
            error = sup.error
            await self.stop(0 if self.nc.is_closed else None)
            raise WorkerFailedError(f"worker {self.worker_id} failed: {error}") from error

    async def stop(self, grace_period: Duration | None = None) -> None:
        """Stop fetching, let in-flight tasks finish within the grace period (while
        heartbeating), nak what is left, leave every elastic group, deregister.
        Idempotent; safe before start. After it returns no task of the worker is left
        on the event loop."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            self._stopped.set()
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        self._state = "stopping"
        grace = (
            self.grace_period
            if grace_period is None
            else seconds(grace_period, name="grace_period", allow_zero=True)
        )
        try:
            if self._converging is not None:
                # a live change in progress ends before the drain (it checks the state)
                await asyncio.wait({self._converging})
            runtimes = list(self._runtimes.values())
            await asyncio.gather(*(rt.drain(grace) for rt in runtimes))
            self._runtimes.clear()
            if self._cancels is not None:
                await self._cancels.stop()
            if self._runs is not None:
                await self._runs.stop()
            if self._directory is not None:
                await self._directory.stop()
        finally:
            if self._supervisor is not None:
                await self._supervisor.stop()
            await self.recorder.close()
            self._state = "stopped"
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def detect_engine(js: Any) -> str:
    """``dagnats`` when the server has DagNats's ``SLEEP_TIMERS`` stream or its
    ``workflow_runs`` bucket (standalone jsworker creates neither), else ``standalone``."""
    try:
        await js.stream_info(dn.MARKER_STREAM)
        return dn.DAGNATS
    except Exception:  # not found (or not answering): look at the bucket
        pass
    try:
        await js.stream_info(f"KV_{dn.RUNS_BUCKET}")
        return dn.DAGNATS
    except Exception:
        return dn.STANDALONE


async def check_dagnats_streams(js: Any) -> None:
    """Refuse, with one line naming the setting, a server whose streams a DagNats-mode
    worker cannot serve: TASK_QUEUES must be a work-queue stream on ``task.>`` and
    WORKFLOW_HISTORY must take ``history.>``."""
    await require_stream(js, n.TASK_STREAM, hint="start the DagNats engine (it creates them)")
    await require_stream(js, n.HISTORY_STREAM, hint="start the DagNats engine (it creates them)")
    tq = (await js.stream_info(n.TASK_STREAM)).config
    retention = getattr(tq.retention, "value", tq.retention)
    if retention != "workqueue":
        raise ConfigError(
            f"stream {n.TASK_STREAM} has retention {retention}; DagNats mode needs workqueue "
            "(DagNats's own setting): this server's streams were not made by DagNats"
        )
    if "task.>" not in (tq.subjects or []):
        raise ConfigError(
            f"stream {n.TASK_STREAM} takes subjects {tq.subjects}, not task.>; DagNats mode "
            "cannot serve it"
        )
    hist = (await js.stream_info(n.HISTORY_STREAM)).config
    if "history.>" not in (hist.subjects or []):
        raise ConfigError(
            f"stream {n.HISTORY_STREAM} takes subjects {hist.subjects}, not history.>; "
            "DagNats mode cannot report outcomes there"
        )
