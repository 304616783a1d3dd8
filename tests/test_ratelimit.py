"""Rate limits (issue 12): token buckets in KV ``rate_limits`` shared by every process.

Live tests run real ``nats-server`` and, for the cluster-wide limit, three worker
processes (``tests/limits_worker.py``). The bucket arithmetic is unit-tested with made-up
clocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker._ratelimit import (
    Bucket,
    RateLimitKeyError,
    bucket_key,
    decode_key_token,
    key_of,
    kv_key_token,
    list_buckets,
    reset_buckets,
    take,
)

LIMITS_WORKER = Path(__file__).with_name("limits_worker.py")
SEC = 1_000_000_000


# ------------------------------------------------------------------ unit layer
def test_take_refills_continuously_and_caps_at_the_limit() -> None:
    rl = jsworker.RateLimit(10, per=1.0)
    b, got, wait = take(None, 1, 5 * SEC, rl)
    assert (got, wait, b.tokens, b.limit, b.period_ns) == (1, 0.0, 9.0, 10, SEC)
    b, got, _ = take(b, 9, 5 * SEC, rl)
    assert got == 9 and b.tokens == 0
    b2, got, wait = take(b, 1, 5 * SEC + SEC // 20, rl)  # 50 ms: half a token
    assert got == 0 and wait == pytest.approx(0.05, rel=1e-6)
    b3, got, _ = take(b2, 1, 5 * SEC + SEC // 10, rl)  # 100 ms: one token
    assert got == 1 and b3.tokens == pytest.approx(0.0, abs=1e-6)
    full, _, _ = take(b3, 0, 100 * SEC, rl)
    assert full.tokens == 10  # never above the bucket size


def test_take_clock_backwards_refills_nothing_and_config_wins() -> None:
    rl = jsworker.RateLimit(2, per=1.0)
    stored = Bucket(0.5, 10 * SEC, 100, SEC)
    b, got, wait = take(stored, 1, 9 * SEC, rl)
    assert got == 0 and b.last_refill_ns == 10 * SEC and b.limit == 2
    assert wait == pytest.approx(0.25)
    over = Bucket(50.0, 10 * SEC, 100, SEC)
    b, got, _ = take(over, 5, 10 * SEC, rl)
    assert got == 2 and b.tokens == 0  # the stored 50 tokens are clamped to the new size


def test_bucket_decode_refuses_invalid_values() -> None:
    exact = Bucket(2.0, 7, 3, SEC)
    assert Bucket.decode(exact.encode()) == exact
    # tokens are stored as an integer (DagNats's engine decodes an int); the fraction
    # moves last_refill_ns back, so the bucket holds the same tokens at any later time
    good = Bucket(1.5, 10 * SEC, 3, SEC)
    stored = json.loads(good.encode())
    assert type(stored["tokens"]) is int and stored["tokens"] == 1
    back = Bucket.decode(good.encode())
    assert back is not None
    rl = jsworker.RateLimit(3, per=1.0)
    for later in (10 * SEC, 10 * SEC + SEC // 10, 11 * SEC):
        assert take(back, 0, later, rl)[0].tokens == pytest.approx(
            take(good, 0, later, rl)[0].tokens
        )
    for raw in (
        b"",
        b"[]",
        b'{"tokens": "1", "last_refill_ns": 1, "limit": 1, "period_ns": 1}',
        b'{"tokens": 1, "last_refill_ns": 1, "limit": 0, "period_ns": 1}',
        b'{"tokens": 1, "last_refill_ns": 1.5, "limit": 1, "period_ns": 1}',
        b'{"tokens": true, "last_refill_ns": 1, "limit": 1, "period_ns": 1}',
        b'{"tokens": 1, "limit": 1, "period_ns": 1}',
    ):
        assert Bucket.decode(raw) is None, raw


def test_keys_are_kv_safe_and_reversible() -> None:
    assert kv_key_token("acme-1") == "acme-1"
    for odd in ("a.b", "x@y.z", "_global", "_deferred", "ü", "a b", "*", "x" * 200):
        token = kv_key_token(odd)
        assert token.startswith("_b") and decode_key_token(token) == odd
    assert bucket_key("sms", None) == "sms._global"
    assert bucket_key("sms", "_global") != "sms._global"


def test_key_of_dot_paths() -> None:
    data = {"customer": {"id": 42, "name": "acme"}, "items": [{"sku": "a1"}]}
    assert key_of("customer.name", data, "task.t.r") == "acme"
    assert key_of("customer.id", data, "task.t.r") == "42"
    assert key_of("items.0.sku", data, "task.t.r") == "a1"
    assert key_of(None, data, "task.t.g.key-7") == "key-7"
    for path in ("customer.missing", "items.3.sku", "customer"):
        with pytest.raises(RateLimitKeyError):
            key_of(path, data, "task.t.r")


def test_rate_limit_options_checked_at_registration() -> None:
    with pytest.raises(jsworker.ConfigError):
        jsworker.RateLimit(0)
    with pytest.raises(jsworker.ConfigError):
        jsworker.RateLimit(1, per=-1)
    with pytest.raises(jsworker.ConfigError):
        jsworker.RateLimit(1, key="")
    assert jsworker.RateLimit(10_000).batch == 100
    assert jsworker.RateLimit(20).batch == 1


async def test_rate_limit_options_refused_on_handle(nc: NATS) -> None:
    w = jsworker.Worker(nc)

    async def h(ctx: jsworker.TaskContext) -> None:
        return None

    with pytest.raises(jsworker.ConfigError, match="key_rate_limit"):
        w.handle("a", h, rate_limit=jsworker.RateLimit(1, key="x"))
    with pytest.raises(jsworker.ConfigError, match="RateLimit"):
        w.handle("a", h, key_rate_limit=5)


# ------------------------------------------------------------------ processes
class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.worker_id = ""
        self.done: list[list[str]] = []
        self._reader: asyncio.Task[None] | None = None

    async def ready(self, timeout: float = 30.0) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError("limits_worker exited before READY")
                parts = raw.decode().split()
                if parts and parts[0] == "READY":
                    self.worker_id = parts[1]
                    break
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            parts = raw.decode().split()
            if parts and parts[0] == "DONE":
                self.done.append(parts[1:])

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        self.kill()
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def workers(env: dict[str, str], count: int, *args: str) -> AsyncIterator[list[Proc]]:
    procs = []
    try:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(LIMITS_WORKER),
                *args,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            procs.append(Proc(proc))
        await asyncio.gather(*(p.ready() for p in procs))
        yield procs
    finally:
        await asyncio.gather(*(p.close() for p in procs))


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_global_limit_holds_across_three_processes(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str]
) -> None:
    """20/s across 3 workers for 5 s: in no 1 s window more than 20 + the bucket size
    (20) complete, while all three workers take part."""
    ttype = unique("rl")
    async with workers(server_env, 3, ttype, "--rate", "20", "--hold", "0.5") as procs:
        client = jsworker.Client(nc)
        await client.submit_many([jsworker.TaskRequest(ttype, {"i": i}) for i in range(130)])
        t0 = time.time()
        await wait_for(lambda: sum(len(p.done) for p in procs) >= 120, 30, "120 completions")
        elapsed = time.time() - t0
        times = sorted(float(d[4]) for p in procs for d in p.done)
        busiest = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        assert busiest <= 40, f"{busiest} completions in one 1 s window"
        # 120 completions need at least (120 - 20) / 20 = 5 s at 20/s
        assert times[119] - times[0] >= 4.5, times[119] - times[0]
        assert elapsed < 15, f"the limit throttled far below 20/s: {elapsed:.1f}s"
        assert all(p.done for p in procs), [len(p.done) for p in procs]
        assert {int(d[2]) for p in procs for d in p.done} == {1}
    buckets = await list_buckets(nc.jetstream(), ttype)
    assert [(b["key"], b["limit"], b["per"]) for b in buckets] == [(None, 20, 1.0)]
    assert await reset_buckets(nc.jetstream(), ttype) == 1
    assert await list_buckets(nc.jetstream(), ttype) == []


async def test_hot_key_does_not_slow_a_cold_one(nc: NATS, unique: Callable[[str], str]) -> None:
    ttype = unique("rlkey")
    done: dict[str, list[float]] = {}
    w = jsworker.Worker(nc, rate_limit_hold=0.3)

    @w.handle(ttype, key_rate_limit=jsworker.RateLimit(1, per=1.0, key="customer"))
    async def h(ctx: jsworker.TaskContext) -> None:
        done.setdefault(ctx.json()["customer"], []).append(time.monotonic())

    async with w:
        client = jsworker.Client(nc)
        t0 = time.monotonic()
        await client.submit_many([jsworker.TaskRequest(ttype, {"customer": "hot"})] * 8)
        await client.submit_many(
            [jsworker.TaskRequest(ttype, {"customer": f"cold{i}"}) for i in range(4)]
        )
        await wait_for(
            lambda: sum(len(done.get(f"cold{i}", [])) for i in range(4)) == 4, 10, "cold"
        )
        cold_done = time.monotonic() - t0
        hot_so_far = len(done.get("hot", []))
        await wait_for(lambda: len(done.get("hot", [])) == 8, 30, "hot")
        hot_done = time.monotonic() - t0
    assert cold_done < 2.5, f"cold keys took {cold_done:.2f}s behind a hot key"
    assert hot_so_far < 8 and hot_done >= 6.5, (hot_so_far, hot_done)
    gaps = [b - a for a, b in zip(done["hot"], done["hot"][1:], strict=False)]
    assert min(gaps) >= 0.9 * 0.5, gaps  # 1/s, with clock and batching slack
    keys = {b["key"] for b in await list_buckets(nc.jetstream(), ttype)}
    assert keys == {"hot", "cold0", "cold1", "cold2", "cold3"}
    assert w.stats.rate_limited > 0  # hot tasks were nak'ed, not only held


async def test_rate_limited_tasks_keep_their_attempt(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    """Deferrals (naks) grow the server's delivery count, not the attempt: a task that
    fails once sees attempt 2 on its retry and is not exhausted by max_attempts=2."""
    ttype = unique("rlatt")
    seen: list[tuple[int, int, str]] = []
    w = jsworker.Worker(nc, rate_limit_hold=0)

    @w.handle(
        ttype,
        rate_limit=jsworker.RateLimit(2, per=1.0),
        retry=jsworker.RetryPolicy.fixed(0.1, max_attempts=2),
    )
    async def h(ctx: jsworker.TaskContext) -> str:
        seen.append((ctx.attempt, ctx._msg.metadata.num_delivered, ctx.json()))
        if ctx.json() == "flaky" and ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    async with w:
        client = jsworker.Client(nc)
        handles = await client.submit_many(
            [jsworker.TaskRequest(ttype, "flaky")]
            + [jsworker.TaskRequest(ttype, f"t{i}") for i in range(7)]
        )
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert results == ["ok"] * 8
    firsts = [s for s in seen if s[2] != "flaky"]
    assert sorted(a for a, _, _ in firsts) == [1] * 7
    assert [a for a, _, v in seen if v == "flaky"] == [1, 2]
    assert any(delivered > attempt for attempt, delivered, _ in seen), seen
    kv = await nc.jetstream().key_value("rate_limits")
    assert [k for k in await kv.keys() if k.startswith(f"{ttype}._deferred.")] == []


async def test_missing_rate_limit_key_fails_permanently(
    nc: NATS, unique: Callable[[str], str]
) -> None:
    ttype = unique("rlmiss")
    w = jsworker.Worker(nc)

    @w.handle(ttype, key_rate_limit=jsworker.RateLimit(5, key="tenant"))
    async def h(ctx: jsworker.TaskContext) -> str:
        return "ran"

    async with w:
        client = jsworker.Client(nc)
        ok = await client.submit(ttype, {"tenant": "a"})
        bad = await client.submit(ttype, {"other": 1})
        assert await ok.result(timeout=10) == "ran"
        with pytest.raises(jsworker.TaskFailed) as e:
            await bad.result(timeout=10)
    assert e.value.kind == "non_retriable" and "tenant" in e.value.error


async def test_cli_ratelimit_show_reset_and_submit_sticky(
    nc: NATS, unique: Callable[[str], str], server_env: dict[str, str]
) -> None:
    from test_cli import acli, no_traceback

    ttype = unique("rlcli")
    w = jsworker.Worker(nc)

    @w.handle(
        ttype,
        rate_limit=jsworker.RateLimit(50, per=2.0),
        key_rate_limit=jsworker.RateLimit(5, per=1.0, key="who"),
    )
    async def h(ctx: jsworker.TaskContext) -> str:
        return ctx.json()["who"]

    async with w:
        client = jsworker.Client(nc)
        for who in ("acme", "x@y.z"):
            assert await (await client.submit(ttype, {"who": who})).result(timeout=10) == who
        p = await acli("ratelimit", "show", ttype, "--json", env=server_env)
        assert p.returncode == 0, p.stderr
        rows = {r["key"]: r for r in json.loads(p.stdout)}
        assert set(rows) == {None, "acme", "x@y.z"}
        assert rows[None]["limit"] == 50 and rows[None]["per"] == 2.0
        assert rows["acme"]["limit"] == 5 and rows["acme"]["tokens"] <= 5
        p = await acli("ratelimit", "show", ttype, env=server_env)
        assert p.returncode == 0 and "x@y.z" in p.stdout and "acme" in p.stdout
        p = await acli("ratelimit", "reset", ttype, "x@y.z", env=server_env)
        assert p.returncode == 0 and "reset 1 bucket" in p.stdout, p.stdout
        left = {b["key"] for b in await list_buckets(nc.jetstream(), ttype)}
        assert left == {None, "acme"}
        p = await acli("ratelimit", "reset", ttype, env=server_env)
        assert p.returncode == 0 and "reset 2 buckets" in p.stdout, p.stdout

        # a sticky step from the CLI goes to the worker that ran the run's first one
        run = unique("run")
        first = await client.submit(ttype, {"who": "a"}, run_id=run, step_id="a", sticky="soft")
        assert await first.result(timeout=10) == "a"
        p = await acli(
            "task", "submit", ttype, '{"who": "b"}', "--run-id", run, "--step-id", "b",
            "--sticky", "soft", "--last-step", "--wait", "--json", env=server_env,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["subject"] == f"sticky.{ttype}.{w.worker_id}.{run}"
        assert out["output"] == "b"

    for args in (
        ("ratelimit", "show", "a.b"),
        ("ratelimit", "reset", "t", ""),
        ("task", "submit", ttype, "{}", "--sticky", "always"),
    ):
        p = await acli(*args, env=server_env)
        assert p.returncode in (1, 2) and p.stderr.strip(), (args, p.stderr)
        no_traceback(p)


async def test_rate_limited_handler_needs_the_bucket(fresh_server: Any) -> None:
    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc)
        await nc.jetstream().delete_key_value("rate_limits")
        w = jsworker.Worker(nc)

        async def h(ctx: jsworker.TaskContext) -> None:
            return None

        w.handle("plain", h)
        w.handle("limited", h, rate_limit=jsworker.RateLimit(1))
        with pytest.raises(jsworker.NotProvisionedError, match="rate_limits"):
            await w.start()
    finally:
        await nc.close()


async def test_unreachable_bucket_defers_never_runs_unlimited(fresh_server: Any) -> None:
    """KV rate_limits gone while the worker runs: the task waits (deferred), it neither
    runs past its limit nor is dropped; once the bucket is back it runs."""
    nc = await nats.connect(fresh_server.url)
    try:
        await jsworker.setup_all(nc)
        w = jsworker.Worker(nc, rate_limit_hold=0)
        ran: list[int] = []

        @w.handle("limited", rate_limit=jsworker.RateLimit(100))
        async def h(ctx: jsworker.TaskContext) -> None:
            ran.append(ctx.attempt)

        async with w:
            client = jsworker.Client(nc)
            assert await (await client.submit("limited", 1)).result(timeout=10) is None
            await nc.jetstream().delete_key_value("rate_limits")
            handle = await client.submit("limited", 2)
            await wait_for(lambda: w.stats.rate_limited >= 2, 15, "two deferrals")
            assert len(ran) == 1
            await jsworker.setup_all(nc)
            assert await handle.result(timeout=15) is None
            assert len(ran) == 2
    finally:
        await nc.close()
