"""Provisioning the streams and buckets: idempotent, check/dry-run change nothing, drift."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

import jsworker
from jsworker import EmbeddedServer

STREAMS = ["TASK_QUEUES", "STICKY_TASKS", "WORKFLOW_HISTORY", "DEAD_LETTERS"]
BUCKETS = [
    "workers",
    "rate_limits",
    "sticky_bindings",
    "elastic-consumer-groups",
    "checkpoints",
    "signals",
]


@pytest.fixture
async def fnc(fresh_server: EmbeddedServer) -> AsyncIterator[NATS]:
    client = await nats.connect(fresh_server.url, allow_reconnect=False)
    yield client
    await client.close()


async def stream_names(nc: NATS) -> set[str]:
    return {s.config.name for s in await nc.jetstream().streams_info()}


def by_name(results: list[jsworker.ProvisionResult]) -> dict[str, jsworker.ProvisionResult]:
    return {r.name: r for r in results}


async def test_setup_all_creates_everything(fnc: NATS) -> None:
    results = await jsworker.setup_all(fnc)
    assert [(r.kind, r.name) for r in results] == [("stream", s) for s in STREAMS] + [
        ("kv", b) for b in BUCKETS
    ]
    assert all(r.status == "created" for r in results)
    assert await stream_names(fnc) == set(STREAMS) | {f"KV_{b}" for b in BUCKETS}
    js = fnc.jetstream()
    tasks = (await js.stream_info("TASK_QUEUES")).config
    assert tasks.subjects == ["task.>"]
    assert tasks.retention == RetentionPolicy.WORK_QUEUE
    assert tasks.duplicate_window == 600
    sticky = (await js.stream_info("STICKY_TASKS")).config
    assert sticky.storage == StorageType.MEMORY and sticky.max_age == 1800
    history = (await js.stream_info("WORKFLOW_HISTORY")).config
    assert history.subjects == ["history.>"] and history.retention == RetentionPolicy.LIMITS
    dead = (await js.stream_info("DEAD_LETTERS")).config
    assert dead.subjects == ["dead.>"]
    workers = await js.key_value("workers")
    assert (await workers.status()).ttl == 60


async def test_setup_all_twice_is_a_noop(fnc: NATS) -> None:
    await jsworker.setup_all(fnc)
    before = {s.config.name: s.created for s in await fnc.jetstream().streams_info()}
    again = await jsworker.setup_all(fnc)
    assert [r.status for r in again] == ["exists"] * 10
    assert all(r.details == [] for r in again)
    after = {s.config.name: s.created for s in await fnc.jetstream().streams_info()}
    assert after == before  # nothing recreated


async def test_check_on_fresh_server_reports_missing_and_creates_nothing(fnc: NATS) -> None:
    results = await jsworker.setup_all(fnc, mode="check")
    assert [r.status for r in results] == ["missing"] * 10
    assert await stream_names(fnc) == set()


async def test_dry_run_creates_nothing(fnc: NATS) -> None:
    results = await jsworker.setup_all(fnc, mode="dry_run")
    assert [r.status for r in results] == ["would-create"] * 10
    assert await stream_names(fnc) == set()


async def test_check_after_setup_reports_exists(fnc: NATS) -> None:
    await jsworker.setup_all(fnc)
    assert {r.status for r in await jsworker.setup_all(fnc, mode="check")} == {"exists"}


async def test_optional_buckets_can_be_skipped(fnc: NATS) -> None:
    results = await jsworker.setup_all(fnc, optional=())
    assert [r.name for r in results if r.kind == "kv"] == BUCKETS[:4]
    names = await stream_names(fnc)
    assert "KV_checkpoints" not in names and "KV_signals" not in names
    assert "KV_workers" in names


async def test_unknown_optional_bucket_refused(fnc: NATS) -> None:
    with pytest.raises(jsworker.ConfigError, match="unknown optional"):
        await jsworker.setup_kv_buckets(fnc, optional=("checkpoints", "nope"))
    assert await stream_names(fnc) == set()


async def _update(nc: NATS, name: str, **changes: Any) -> None:
    js = nc.jetstream()
    cfg: StreamConfig = (await js.stream_info(name)).config
    for k, v in changes.items():
        setattr(cfg, k, v)
    await js.update_stream(cfg)


async def test_safe_drift_detected_and_fixed(fnc: NATS) -> None:
    await jsworker.setup_all(fnc)
    await _update(fnc, "TASK_QUEUES", duplicate_window=60.0)
    await _update(fnc, "WORKFLOW_HISTORY", max_age=3600.0)

    check = by_name(await jsworker.setup_all(fnc, mode="check"))
    assert check["TASK_QUEUES"].status == "drifted"
    assert any("duplicate_window" in d for d in check["TASK_QUEUES"].details)
    assert check["WORKFLOW_HISTORY"].status == "drifted"
    assert any("max_age" in d for d in check["WORKFLOW_HISTORY"].details)
    assert check["DEAD_LETTERS"].status == "exists"

    dry = by_name(await jsworker.setup_all(fnc, mode="dry_run"))
    assert dry["TASK_QUEUES"].status == "would-update"
    js = fnc.jetstream()
    assert (await js.stream_info("TASK_QUEUES")).config.duplicate_window == 60  # unchanged

    applied = by_name(await jsworker.setup_all(fnc))
    assert applied["TASK_QUEUES"].status == "updated"
    assert applied["WORKFLOW_HISTORY"].status == "updated"
    assert (await js.stream_info("TASK_QUEUES")).config.duplicate_window == 600
    assert (await js.stream_info("WORKFLOW_HISTORY")).config.max_age == 30 * 86400
    assert {r.status for r in await jsworker.setup_all(fnc)} == {"exists"}


async def test_drift_left_alone_when_update_false(fnc: NATS) -> None:
    await jsworker.setup_all(fnc)
    await _update(fnc, "DEAD_LETTERS", max_age=3600.0)
    res = by_name(await jsworker.setup_all(fnc, update=False))
    assert res["DEAD_LETTERS"].status == "drifted"
    assert (await fnc.jetstream().stream_info("DEAD_LETTERS")).config.max_age == 3600


async def test_unsafe_drift_reported_and_left_alone(fnc: NATS) -> None:
    await jsworker.setup_all(fnc)
    await _update(fnc, "WORKFLOW_HISTORY", retention=RetentionPolicy.INTEREST)
    for mode in ("check", "dry_run", "apply"):
        res = by_name(await jsworker.setup_all(fnc, mode=mode))  # type: ignore[arg-type]
        hist = res["WORKFLOW_HISTORY"]
        assert hist.status == "drifted", (mode, hist)
        assert any("retention" in d and "cannot be changed" in d for d in hist.details)
        assert res["TASK_QUEUES"].status == "exists"
    cfg = (await fnc.jetstream().stream_info("WORKFLOW_HISTORY")).config
    assert cfg.retention == RetentionPolicy.INTEREST  # never recreated behind our back


async def test_unsafe_and_safe_drift_together(fnc: NATS) -> None:
    """A safe field is fixed even when an unsafe one drifted too; the result stays drifted."""
    js = fnc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="DEAD_LETTERS",
            subjects=["dead.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY,
            max_age=3600,
            duplicate_window=60,
        )
    )
    res = by_name(await jsworker.setup_streams(fnc))
    dead = res["DEAD_LETTERS"]
    assert dead.status == "drifted"
    assert any("storage" in d for d in dead.details)
    cfg = (await js.stream_info("DEAD_LETTERS")).config
    assert cfg.storage == StorageType.MEMORY
    assert cfg.max_age == 30 * 86400
    assert res["TASK_QUEUES"].status == "created"


async def test_missing_subject_is_drift(fnc: NATS) -> None:
    js = fnc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="TASK_QUEUES",
            subjects=["task.a.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            duplicate_window=600,
        )
    )
    check = by_name(await jsworker.setup_streams(fnc, mode="check"))
    assert check["TASK_QUEUES"].status == "drifted"
    assert any("task.>" in d for d in check["TASK_QUEUES"].details)
    applied = by_name(await jsworker.setup_streams(fnc))
    assert applied["TASK_QUEUES"].status == "updated", applied["TASK_QUEUES"].details
    assert "task.>" in ((await js.stream_info("TASK_QUEUES")).config.subjects or [])


@pytest.mark.parametrize("replicas", [0, 6, -1, True, "3", 1.0])
async def test_replicas_out_of_range(fnc: NATS, replicas: Any) -> None:
    with pytest.raises(jsworker.ConfigError, match="replicas"):
        await jsworker.setup_all(fnc, replicas=replicas)
    with pytest.raises(jsworker.ConfigError):
        await jsworker.setup_streams(fnc, replicas=replicas)
    with pytest.raises(jsworker.ConfigError):
        await jsworker.setup_kv_buckets(fnc, replicas=replicas)
    assert await stream_names(fnc) == set()


async def test_result_as_dict(fnc: NATS) -> None:
    (first, *_) = await jsworker.setup_streams(fnc, mode="check")
    assert first.as_dict() == {
        "kind": "stream",
        "name": "TASK_QUEUES",
        "status": "missing",
        "details": [],
    }


async def test_server_without_jetstream(unused_tcp_port: int) -> None:
    """A server without JetStream gives a ServerError that says so."""
    binary = jsworker.find_nats_server()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "-a",
        "127.0.0.1",
        "-p",
        str(unused_tcp_port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        nc = None
        for _ in range(100):
            try:
                nc = await nats.connect(
                    f"nats://127.0.0.1:{unused_tcp_port}", allow_reconnect=False
                )
                break
            except Exception:
                await asyncio.sleep(0.05)
        assert nc is not None, "plain nats-server did not come up"
        try:
            with pytest.raises(jsworker.ServerError, match="JetStream is not enabled"):
                await jsworker.setup_all(nc)
        finally:
            await nc.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


class _PlacementFails:
    """A JetStream context whose first ``fails`` stream creations are refused with
    ``err_code`` (what a cluster answers before every node has reported): it tests the
    retry decision only; creating streams on real servers is tested above."""

    def __init__(self, fails: int, err_code: int) -> None:
        self.fails = fails
        self.err_code = err_code
        self.calls = 0

    async def add_stream(self, config: StreamConfig) -> None:
        import nats.js.errors

        self.calls += 1
        if self.calls <= self.fails:
            raise nats.js.errors.BadRequestError(
                code=400, err_code=self.err_code, description="no suitable peers for placement"
            )


async def test_placement_refusal_is_retried_for_replicated_streams() -> None:
    from jsworker import _provision

    spec = next(s for s in _provision.stream_specs() if s.kv_bucket is None)
    js = _PlacementFails(fails=3, err_code=10005)
    await _provision._create(js, spec, replicas=3)  # type: ignore[arg-type]
    assert js.calls == 4
    import nats.js.errors

    for fails, code, replicas in ((1, 10005, 1), (1, 10058, 3)):
        js = _PlacementFails(fails=fails, err_code=code)
        with pytest.raises(nats.js.errors.APIError):  # not retried: single replica, other code
            await _provision._create(js, spec, replicas=replicas)  # type: ignore[arg-type]
        assert js.calls == 1
