"""Rate limits: token buckets in KV ``rate_limits``, shared by every worker of the cluster.

A handler declares ``rate_limit=RateLimit(10, per=1.0)`` (one bucket per task type, key
``{type}._global``) and/or ``key_rate_limit=RateLimit(1, per=1.0, key="customer_id")``
(one bucket per key, ``{type}.{key}``). Before the handler runs, the executor's gate takes
one token from each bucket (the key's first, so a hot key never spends the global
budget of a cold one). The bucket is JSON ``{tokens, last_refill_ns, limit, period_ns}``,
refilled continuously, and every change is a compare-and-swap on the entry's revision
(bounded retries), so workers in any process or language share one budget.

Waiting never spends an attempt (docs/wire.md, "Rate limits"): a short wait is held
(the lease is renewed by the runtime's heartbeat), a long one is nak'ed with the delay
and counted in a deferral record ``{type}._deferred.{stream}.{seq}``, which the attempt
the handler sees subtracts from the server's delivery count.

Limits above what one KV round trip per task allows are served from a per-process
batch: a process takes up to :data:`BATCH_WINDOW` seconds' worth of tokens at once and
spends them locally; unspent tokens lapse after :data:`BATCH_TTL`. The cost in
precision is documented in docs/rate-limiting.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from . import _names as n
from ._duration import seconds
from ._errors import ConfigError, NotProvisionedError, PermanentError
from ._wire import dumps, loads

log = logging.getLogger("jsworker.ratelimit")

GLOBAL_KEY = "_global"
DEFERRED = "_deferred"
#: compare-and-swap attempts per take before the task waits a little and tries again
CAS_RETRIES = 16
#: a process takes at most this many seconds' worth of tokens in one KV round trip
BATCH_WINDOW = 0.01
#: tokens of a batch not spent within this many seconds lapse (are never used)
BATCH_TTL = 1.0
#: waits up to this long are held (lease renewed), longer ones are nak'ed (default)
DEFAULT_HOLD = 2.0
_PLAIN_KEY = re.compile(r"^[-=a-zA-Z0-9][-_=a-zA-Z0-9]{0,127}$")


class RateLimitKeyError(PermanentError):
    """The task has no value at the handler's ``key_rate_limit`` key path."""


@dataclass(frozen=True, slots=True, init=False)
class RateLimit:
    """At most ``limit`` tasks per ``per`` seconds (a float or ``timedelta``, default 1 s),
    with bursts of up to ``limit`` (the bucket starts full).

    ``key`` (only for ``key_rate_limit=``): a dot path into the task's input
    (``"customer.id"``; list items by index, ``"items.0"``), or ``None`` for the key
    given at submit (``submit(..., key=)``, the subject's last token, which is the run
    id when no key was given). A task whose input has no value there fails permanently
    (``RateLimitKeyError``); it is dead-lettered and can be replayed.
    """

    limit: int
    per: float
    key: str | None

    def __init__(self, limit: int, per: float | timedelta = 1.0, *, key: str | None = None):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"RateLimit limit must be an int >= 1, got {limit!r}")
        p = seconds(per, name="RateLimit per", minimum=0.001, maximum=366 * 86400.0)
        if key is not None and (not isinstance(key, str) or not key or ".." in key):
            raise ConfigError(f"RateLimit key must be a non-empty dot path, got {key!r}")
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "per", p)
        object.__setattr__(self, "key", key)

    @property
    def period_ns(self) -> int:
        return round(self.per * 1e9)

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.limit / self.per

    @property
    def batch(self) -> int:
        """Tokens one process takes per KV round trip: :data:`BATCH_WINDOW` seconds'
        worth, at least 1, at most half the bucket."""
        return max(1, min(int(self.rate * BATCH_WINDOW), self.limit // 2))


def check_limit(value: object, what: str, *, keyed: bool) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, RateLimit):
        raise ConfigError(f"{what} must be a jsworker.RateLimit, got {type(value).__name__}")
    if not keyed and value.key is not None:
        raise ConfigError(f"{what} is the global limit: key= belongs in key_rate_limit=")
    return value


# ------------------------------------------------------------------ keys
def kv_key_token(value: str) -> str:
    """A rate-limit key as it appears in the KV key: itself when it is 1-128 of
    ``[-_=a-zA-Z0-9]`` not starting with ``_``; otherwise ``_b`` + unpadded base64url of
    its UTF-8 bytes (so ``_global`` and ``_deferred`` can never be a user's key)."""
    if _PLAIN_KEY.match(value):
        return value
    return "_b" + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def bucket_key(task_type: str, key: str | None) -> str:
    return f"{task_type}.{GLOBAL_KEY if key is None else kv_key_token(key)}"


def deferral_key(task_type: str, stream: str, seq: int) -> str:
    return f"{task_type}.{DEFERRED}.{kv_key_token(stream)}.{seq}"


def key_of(path: str | None, task_input: Any, subject: str) -> str:
    """The rate-limit key of one task: the value at ``path`` in its input (strings as
    they are, numbers and booleans as JSON), or the subject's last token."""
    if path is None:
        return subject.rsplit(".", 1)[-1]
    cur = task_input
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise RateLimitKeyError(f"rate-limit key {path!r} not found in the task input")
    if isinstance(cur, str) and cur:
        return cur[: n.MAX_ID_LEN]
    if isinstance(cur, int | float) and not isinstance(cur, bool):
        return dumps(cur).decode()
    raise RateLimitKeyError(
        f"rate-limit key {path!r} must be a non-empty string or a number, "
        f"got {dumps(cur).decode()[:40]}"
    )


# ------------------------------------------------------- the bucket itself
@dataclass(frozen=True, slots=True)
class Bucket:
    """One token bucket as stored in KV ``rate_limits`` (docs/wire.md)."""

    tokens: float
    last_refill_ns: int
    limit: int
    period_ns: int

    def encode(self) -> bytes:
        """``tokens`` is written as an integer, as DagNats's engine decodes it (Go
        ``int``; a float breaks its decode of the shared bucket): the fraction of a token
        is kept by moving ``last_refill_ns`` back by the time that fraction takes to
        refill, which gives the same tokens at any later time."""
        whole = math.floor(max(0.0, self.tokens) + 1e-9)
        frac = max(0.0, self.tokens) - whole
        shift = round(frac * self.period_ns / self.limit) if frac > 1e-9 else 0
        return dumps(
            {
                "tokens": int(whole),
                "last_refill_ns": max(1, self.last_refill_ns - shift),
                "limit": self.limit,
                "period_ns": self.period_ns,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> Bucket | None:
        """The bucket, or ``None`` when the value is not a valid bucket (then it is
        replaced by a full one)."""
        try:
            obj = loads(raw or b"")
            tokens = obj["tokens"]
            last = obj["last_refill_ns"]
            limit = obj["limit"]
            period = obj["period_ns"]
        except (ValueError, KeyError, TypeError):
            return None
        if (
            not isinstance(tokens, int | float)
            or isinstance(tokens, bool)
            or not math.isfinite(tokens)
            or not all(type(v) is int and v > 0 for v in (last, limit, period))
        ):
            return None
        return cls(float(tokens), last, limit, period)


def take(bucket: Bucket | None, want: int, now_ns: int, rl: RateLimit) -> tuple[Bucket, int, float]:
    """Refill ``bucket`` to ``now_ns`` under ``rl`` (the handler's declaration wins over
    what is stored), then take up to ``want`` whole tokens.

    Returns ``(new bucket, tokens taken, seconds until the next token when none was
    taken)``. Pure: the unit tests drive it with made-up clocks. A missing or invalid
    bucket starts full; a clock that went backwards refills nothing."""
    period = rl.period_ns
    if bucket is None:
        tokens, last = float(rl.limit), now_ns
    else:
        elapsed = max(0, now_ns - bucket.last_refill_ns)
        tokens = min(float(rl.limit), max(0.0, bucket.tokens) + elapsed * rl.limit / period)
        last = max(now_ns, bucket.last_refill_ns)
    got = min(want, int(tokens + 1e-9))
    if got >= 1:
        return Bucket(tokens - got, last, rl.limit, period), got, 0.0
    wait = (1.0 - tokens) * period / rl.limit / 1e9
    return Bucket(tokens, last, rl.limit, period), 0, max(wait, 0.001)


# ------------------------------------------------------------ the limiter
class _Gate:
    """This process's side of one bucket: a FIFO of waiting tasks (only the head talks
    to the KV), the tokens of the last batch, and when the next token is due."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = asyncio.Lock()
        self.local = 0
        self.local_until = 0.0
        self.not_before = 0.0
        self.waiters = 0


class Limiter:
    """The worker's rate limiter: binds KV ``rate_limits`` and keeps one :class:`_Gate`
    per bucket. ``hold``: waits up to this long are held, longer ones deferred."""

    def __init__(self, js: JetStreamContext, *, hold: float = DEFAULT_HOLD) -> None:
        self.js = js
        self.hold = hold
        self.kv: KeyValue | None = None
        self._gates: dict[str, _Gate] = {}
        #: compare-and-swap conflicts seen (for tests and status)
        self.conflicts = 0

    async def bind(self) -> KeyValue:
        if self.kv is None:
            try:
                self.kv = await self.js.key_value(n.RATE_LIMITS_BUCKET)
            except nats.js.errors.NotFoundError:
                raise NotProvisionedError(
                    f"KV bucket {n.RATE_LIMITS_BUCKET!r} does not exist: run `jsworker kv setup`"
                ) from None
        return self.kv

    async def acquire(
        self, key: str, rl: RateLimit, draining: asyncio.Event, *, can_defer: bool
    ) -> float:
        """Take one token of bucket ``key``: ``0.0`` once taken (after holding the task
        for waits up to ``hold``), else the delay to defer the task by. With
        ``can_defer=False`` (ordered handlers) it holds for as long as it takes. A
        drain ends the hold and defers."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(key)
        if gate.local > 0 and not gate.waiters and time.monotonic() < gate.local_until:
            gate.local -= 1  # the common case under a generous limit: no await at all
            return 0.0
        interval = 1.0 / rl.rate
        if can_defer and gate.waiters:
            # tasks queued ahead of this one in this process: estimate its turn
            ahead = max(gate.not_before - time.monotonic(), 0.0) + gate.waiters * interval
            if ahead > self.hold:
                return ahead
        gate.waiters += 1
        try:
            async with gate.lock:
                while True:
                    now = time.monotonic()
                    if gate.local > 0 and now < gate.local_until:
                        gate.local -= 1
                        return 0.0
                    gate.local = 0
                    if now >= gate.not_before:
                        got, wait = await self._take(key, rl)
                        if got:
                            gate.local = got - 1
                            gate.local_until = time.monotonic() + BATCH_TTL
                            return 0.0
                        gate.not_before = time.monotonic() + wait
                    wait = max(gate.not_before - time.monotonic(), 0.0)
                    if can_defer and wait > self.hold:
                        return wait
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(draining.wait(), wait)
                    if draining.is_set():
                        return max(gate.not_before - time.monotonic(), 0.0)
        finally:
            gate.waiters -= 1

    async def _take(self, key: str, rl: RateLimit) -> tuple[int, float]:
        """One compare-and-swap take of up to ``rl.batch`` tokens from the KV bucket.
        Conflicts are retried :data:`CAS_RETRIES` times; after that the caller waits a
        short, random time and tries again (nothing is dropped)."""
        kv = await self.bind()
        for i in range(CAS_RETRIES):
            try:
                entry = await kv.get(key)
                current, rev = Bucket.decode(entry.value), entry.revision
                if current is None:
                    log.warning("rate-limit bucket %s held an invalid value: reset", key)
            except nats.js.errors.KeyNotFoundError:  # also a deleted key (KeyDeletedError)
                current, rev = None, None
            new, got, wait = take(current, rl.batch, time.time_ns(), rl)
            if not got and current is not None and rev is not None:
                return 0, wait  # nothing to take: no write needed
            try:
                if rev is None:
                    await kv.create(key, new.encode())
                else:
                    await kv.update(key, new.encode(), last=rev)
                return got, wait
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts += 1
                await asyncio.sleep(random.uniform(0, 0.001 * (i + 1)))
        return 0, random.uniform(0.005, 0.05)

    # ---------------------------------------------------- deferral records
    async def deferrals(self, task_type: str, stream: str, seq: int) -> int:
        """How often this message was deferred by a rate limit (0 when never)."""
        kv = await self.bind()
        try:
            entry = await kv.get(deferral_key(task_type, stream, seq))
        except nats.js.errors.KeyNotFoundError:
            return 0
        try:
            value = loads(entry.value or b"")["deferrals"]
        except (ValueError, KeyError, TypeError):
            return 0
        return value if type(value) is int and value > 0 else 0

    async def record_deferral(
        self, task_type: str, stream: str, seq: int, count: int, run_id: str
    ) -> None:
        kv = await self.bind()
        await kv.put(
            deferral_key(task_type, stream, seq), dumps({"deferrals": count, "run_id": run_id})
        )

    async def forget_deferrals(self, task_type: str, stream: str, seq: int) -> None:
        kv = await self.bind()
        with contextlib.suppress(Exception):
            await kv.purge(deferral_key(task_type, stream, seq))


# ------------------------------------------------------------ operating
async def _bucket_kv(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(n.RATE_LIMITS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.RATE_LIMITS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None


def decode_key_token(token: str) -> str:
    """The user's key from its KV form (inverse of :func:`kv_key_token`)."""
    if token.startswith("_b"):
        raw = token[2:]
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    return token


async def list_buckets(js: JetStreamContext, task_type: str) -> list[dict[str, Any]]:
    """The buckets of ``task_type`` with their tokens refilled to now (read only):
    ``key`` (``None`` for the global bucket), ``kv_key``, ``tokens``, ``limit``,
    ``per`` (seconds), ``last_refill_ns``; an invalid value is listed with ``error``.
    Also ``deferred``: tasks waiting with a deferral record."""
    from ._services import kv_snapshot

    n.validate_task_type(task_type)
    kv = await _bucket_kv(js)
    now = time.time_ns()
    out: list[dict[str, Any]] = []
    for kv_key, raw in sorted((await kv_snapshot(kv, f"{task_type}.>")).items()):
        token = kv_key[len(task_type) + 1 :]
        if token.startswith(DEFERRED + "."):
            continue
        b = Bucket.decode(raw)
        key = None if token == GLOBAL_KEY else decode_key_token(token)
        if b is None:
            out.append({"key": key, "kv_key": kv_key, "error": "invalid bucket value"})
            continue
        per = b.period_ns / 1e9
        elapsed = max(0, now - b.last_refill_ns)
        tokens = min(float(b.limit), max(0.0, b.tokens) + elapsed * b.limit / b.period_ns)
        out.append(
            {
                "key": key,
                "kv_key": kv_key,
                "tokens": round(tokens, 3),
                "limit": b.limit,
                "per": per,
                "last_refill_ns": b.last_refill_ns,
            }
        )
    return out


async def reset_buckets(js: JetStreamContext, task_type: str, key: str | None = None) -> int:
    """Delete the buckets of ``task_type`` (every one, or only ``key``'s; ``"_global"``
    names the global bucket); the next task finds a full bucket. Deferral records are
    kept (they hold attempt counts). Returns how many were deleted."""
    from ._services import kv_snapshot

    n.validate_task_type(task_type)
    kv = await _bucket_kv(js)
    if key is not None:
        names = [f"{task_type}.{GLOBAL_KEY}" if key == GLOBAL_KEY else bucket_key(task_type, key)]
    else:
        names = [
            k
            for k in (await kv_snapshot(kv, f"{task_type}.>"))
            if not k[len(task_type) + 1 :].startswith(DEFERRED + ".")
        ]
    deleted = 0
    for name in names:
        try:
            await kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            continue
        await kv.purge(name)
        deleted += 1
    return deleted


async def list_rate_limits(nc: NATS, task_type: str) -> list[dict[str, Any]]:
    """The rate-limit buckets of ``task_type`` (see :func:`list_buckets`): ``key``
    (``None`` for the global bucket), ``tokens`` now, ``limit``, ``per`` (seconds).
    Raises ``InvalidNameError`` for a bad type, ``NotProvisionedError`` without KV
    ``rate_limits``."""
    return await list_buckets(nc.jetstream(), task_type)


async def reset_rate_limits(nc: NATS, task_type: str, key: str | None = None) -> int:
    """Reset (delete) the buckets of ``task_type``, or only ``key``'s (``"_global"``: the
    global one); the next task finds a full bucket. Returns how many were reset."""
    return await reset_buckets(nc.jetstream(), task_type, key)
