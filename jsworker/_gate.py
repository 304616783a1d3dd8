"""The gate a task passes before its handler runs: sticky binding and rate limits.

:meth:`Gate.admit` is called by the executor for a task whose handler declares a rate
limit or whose message is sticky (``Jsworker-Sticky``); every other task skips it. It
either admits the task (with the attempt the handler and the retry policy see, which
does not count rate-limit deferrals), defers it (nak'ed with the delay until its next
token; the deferral is recorded, so the attempt stays), or turns it into a terminal
failure (a hard-sticky task whose worker is gone, a missing rate-limit key).
:meth:`Gate.finished` cleans up after the outcome is recorded: the deferral record once
the message is settled, the run's binding once the run ended.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from . import _wire as w
from ._context import Outcome, TaskInfo
from ._handler import HandlerRuntime, HandlerSpec
from ._ratelimit import Limiter, RateLimitKeyError, bucket_key, key_of
from ._stats import WorkerStats
from ._sticky import STICKY_HEADER, STICKY_WORKER_GONE, StickyTask, bindings_kv

log = logging.getLogger("jsworker.gate")

#: a task whose rate limit cannot be checked (KV unreachable) is deferred this long
KV_ERROR_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class Admission:
    info: TaskInfo
    deferrals: int = 0
    sticky: StickyTask | None = None
    #: set when the task must end as a terminal failure of this kind, not run
    failure: tuple[Outcome, str] | None = None


class Gate:
    def __init__(
        self, js: JetStreamContext, worker_id: str, limiter: Limiter, stats: WorkerStats
    ) -> None:
        self.js = js
        self.worker_id = worker_id
        self.limiter = limiter
        self.stats = stats
        self._bindings: KeyValue | None = None

    @staticmethod
    def applies(rt: HandlerRuntime, msg: Msg) -> bool:
        spec = rt.spec
        if spec.rate_limit is not None or spec.key_rate_limit is not None:
            return True
        h = msg.headers
        return h is not None and STICKY_HEADER in h

    async def bindings(self) -> KeyValue:
        if self._bindings is None:
            self._bindings = await bindings_kv(self.js)
        return self._bindings

    async def admit(
        self, rt: HandlerRuntime, msg: Msg, info: TaskInfo, task_input: object
    ) -> Admission | None:
        """Admit, fail or defer one task; ``None`` when it was deferred (nak'ed)."""
        spec = rt.spec
        # partitioned handlers keep their per-key order: stickiness does not apply
        sticky = None if rt.ordered else StickyTask.of(msg)
        if sticky is not None and sticky.failed:
            return Admission(
                info,
                sticky=sticky,
                failure=(Outcome("permanent", error=sticky.failed), STICKY_WORKER_GONE),
            )
        deferrals = 0
        if spec.rate_limit is not None or spec.key_rate_limit is not None:
            meta = msg.metadata
            stream, seq = meta.stream, meta.sequence.stream
            if meta.num_delivered > 1:
                try:
                    deferrals = await self.limiter.deferrals(spec.task_type, stream, seq)
                except Exception as e:  # the attempt may count a deferral: logged
                    log.warning("reading the deferrals of %s failed: %s", info.run_id, e)
                if deferrals:
                    info = replace(info, attempt=max(1, info.attempt - deferrals))
            limits = []
            if spec.key_rate_limit is not None:
                try:
                    key = key_of(spec.key_rate_limit.key, task_input, info.subject)
                except RateLimitKeyError as e:
                    failure = (Outcome("permanent", error=str(e)), w.NON_RETRIABLE)
                    return Admission(info, deferrals, sticky, failure)
                limits.append((bucket_key(spec.task_type, key), spec.key_rate_limit))
            if spec.rate_limit is not None:
                limits.append((bucket_key(spec.task_type, None), spec.rate_limit))
            for key, rl in limits:
                try:
                    delay = await self.limiter.acquire(
                        key, rl, rt.draining, can_defer=not rt.ordered
                    )
                except Exception as e:
                    # KV rate_limits unreachable: the task waits (deferred), never runs
                    # unlimited and is never dropped
                    log.warning("rate limit %s not checked (%s): task deferred", key, e)
                    delay = KV_ERROR_DELAY
                if delay > 0:
                    await self._defer(spec, msg, info, stream, seq, deferrals + 1, delay)
                    return None
        if sticky is not None:
            try:
                await (await self.bindings()).put(info.run_id, self.worker_id.encode())
            except Exception as e:  # the task runs; its next steps may go elsewhere
                log.warning("binding run %s to this worker failed: %s", info.run_id, e)
        return Admission(info, deferrals, sticky)

    async def _defer(
        self,
        spec: HandlerSpec,
        msg: Msg,
        info: TaskInfo,
        stream: str,
        seq: int,
        count: int,
        delay: float,
    ) -> None:
        try:
            await self.limiter.record_deferral(spec.task_type, stream, seq, count, info.run_id)
        except Exception as e:
            # without the record the next delivery counts one attempt more: logged
            log.warning("deferral of %s/%s not recorded: %s", info.run_id, info.step_id, e)
        self.stats.rate_limited += 1
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def finished(self, spec: HandlerSpec, adm: Admission, outcome: Outcome, msg: Msg) -> None:
        """After the outcome is recorded: drop the deferral record once the message is
        settled (anything but a retry), and the binding once the run ended."""
        info = adm.info
        retry = outcome.kind in ("fail", "retry_after") and not spec.retry.exhausted(info.attempt)
        if adm.deferrals and not retry:
            meta = msg.metadata
            await self.limiter.forget_deferrals(spec.task_type, meta.stream, meta.sequence.stream)
        sticky = adm.sticky
        if sticky is None or retry or outcome.kind == "continue":
            return
        if sticky.last or outcome.kind != "complete":
            with contextlib.suppress(Exception):
                await (await self.bindings()).delete(info.run_id)
