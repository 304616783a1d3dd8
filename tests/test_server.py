"""The embedded nats-server: start, url, taken ports, clean stop, auth, limits."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import nats
import nats.errors
import pytest

import jsworker
from jsworker import EmbeddedCluster, EmbeddedServer
from jsworker._server import _ephemeral_range


async def _connect(url: str, **kw: object) -> nats.NATS:
    return await nats.connect(url, allow_reconnect=False, connect_timeout=2, **kw)


async def test_embedded_server_starts_and_stops_cleanly() -> None:
    srv = EmbeddedServer()
    assert not srv.running
    await srv.start()
    try:
        assert srv.running and srv.pid
        assert srv.url.startswith("nats://127.0.0.1:")
        assert srv.port > 0
        store = srv.store_dir
        assert store is not None and store.is_dir()
        nc = await _connect(srv.url)
        info = await nc.jetstream().account_info()  # JetStream is on
        assert info is not None
        await nc.close()
    finally:
        pid = srv.pid
        await srv.stop()
    assert not srv.running
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone (reaped), not a zombie
    assert not store.exists()  # temp store removed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    await srv.stop()  # idempotent


async def test_async_with_and_sync_context() -> None:
    async with EmbeddedServer() as srv:
        nc = await _connect(srv.url)
        assert nc.is_connected
        await nc.close()
    assert not srv.running
    with EmbeddedServer() as srv2:
        assert srv2.running
    assert not srv2.running


async def test_taken_port_gives_embedded_server_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = EmbeddedServer(port=port)
        with pytest.raises(jsworker.EmbeddedServerError, match=str(port)):
            await srv.start()
        assert not srv.running
    assert issubclass(jsworker.EmbeddedServerError, jsworker.ServerError)


async def test_port_of_running_server_refused() -> None:
    async with EmbeddedServer() as first:
        second = EmbeddedServer(port=first.port)
        with pytest.raises(jsworker.EmbeddedServerError, match="in use"):
            await second.start()
        assert first.running  # the first one is untouched
        nc = await _connect(first.url)
        await nc.close()


async def test_start_twice_refused() -> None:
    async with EmbeddedServer() as srv:
        with pytest.raises(jsworker.EmbeddedServerError, match="already running"):
            await srv.start()


async def test_explicit_port_and_store_dir(tmp_path: Path, unused_tcp_port: int) -> None:
    async with EmbeddedServer(port=unused_tcp_port, store_dir=tmp_path / "store") as srv:
        assert srv.url == f"nats://127.0.0.1:{unused_tcp_port}"
        nc = await _connect(srv.url)
        await jsworker.setup_streams(nc)
        await nc.close()
    # a store dir given by the caller is kept, with the JetStream data in it
    assert (tmp_path / "store" / "js").is_dir()


async def test_restart_keeps_streams() -> None:
    async with EmbeddedServer() as srv:
        port = srv.port
        nc = await _connect(srv.url)
        await jsworker.setup_streams(nc)
        await nc.close()
        await srv.restart()
        assert srv.port == port and srv.running
        nc = await _connect(srv.url)
        names = {s.config.name for s in await nc.jetstream().streams_info()}
        assert "TASK_QUEUES" in names
        await nc.close()


async def test_token_auth() -> None:
    async with EmbeddedServer(token="s3cret") as srv:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _refused(srv.url)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _refused(srv.url, token="wrong")
        nc = await _connect(srv.url, token="s3cret")
        assert nc.is_connected
        await nc.close()


async def test_user_password_auth() -> None:
    async with EmbeddedServer(user="alice", password="pw") as srv:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _refused(srv.url)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _refused(srv.url, user="alice", password="nope")
        nc = await _connect(srv.url, user="alice", password="pw")
        assert nc.is_connected
        await nc.close()


async def _quiet(e: Exception) -> None:
    return None


async def _refused(url: str, **kw: object) -> None:
    """Connect and expect the server to refuse; nats-py's own error is re-raised after the
    half-open client is closed (nats-py leaves its transport open on an auth error)."""
    nc = nats.NATS()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=_quiet, **kw)
    except nats.errors.Error:
        await nc.close()
        raise
    await nc.close()


async def test_max_payload_limits_client(unique: Callable[[str], str]) -> None:
    async with EmbeddedServer(max_payload=4096) as srv:
        nc = await _connect(srv.url)
        try:
            assert nc.max_payload == 4096
            await jsworker.setup_streams(nc)
            client = jsworker.Client(nc)
            with pytest.raises(jsworker.PayloadError, match="4096"):
                await client.submit(unique("t"), "x" * 4096)
            await client.submit(unique("t"), "x" * 1000)
        finally:
            await nc.close()


async def test_missing_binary_named_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSWORKER_NATS_SERVER", "/nonexistent/nats-server")
    with pytest.raises(jsworker.EmbeddedServerError, match="JSWORKER_NATS_SERVER"):
        jsworker.find_nats_server()
    with pytest.raises(jsworker.EmbeddedServerError):
        await EmbeddedServer().start()


def test_find_nats_server_is_executable() -> None:
    path = jsworker.find_nats_server()
    assert os.access(path, os.X_OK)


async def test_bad_config_fails_fast_with_log() -> None:
    srv = EmbeddedServer(extra_config="this is { not valid")
    t0 = time.monotonic()
    with pytest.raises(jsworker.EmbeddedServerError):
        await srv.start()
    assert time.monotonic() - t0 < 10
    await srv.stop()


async def test_cluster_serves_jetstream_once_started() -> None:
    """Once ``start()`` returns, the cluster answers JetStream requests (replicas 3)."""
    async with EmbeddedCluster(3, name="jsw-ready") as cluster:
        assert len(cluster.urls) == 3
        nc = await nats.connect(servers=cluster.urls, connect_timeout=2)
        try:
            try:
                results = await asyncio.wait_for(jsworker.setup_all(nc, replicas=3), 30)
            except Exception as e:
                # seen once in ~55 loaded starts: "no suitable peers for placement, peer
                # offline" on a stream created after the readiness probe had placed one;
                # the nodes' logs are what tells why (route lost? new meta leader?)
                logs = "\n".join(f"--- {s.name}\n{s.log_tail(40)}" for s in cluster.servers)
                raise AssertionError(f"setup_all failed after start(): {e!r}\n{logs}") from e
            assert {r.status for r in results} == {"created"}
            info = await nc.jetstream().stream_info("TASK_QUEUES")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        finally:
            await nc.close()
    assert not any(s.running for s in cluster.servers)


def test_cluster_ports_are_below_the_kernels_ephemeral_range() -> None:
    """A killed node restarts on its own ports, so nothing may take them meanwhile: the
    kernel gives ports of its ephemeral range to anyone binding port 0 and to outgoing
    connections, never ports below it."""
    cluster = EmbeddedCluster(3, name="jsw-ports")  # not started: ports are chosen here
    try:
        lo, _ = _ephemeral_range()
        ports = [s.port for s in cluster.servers] + cluster.route_ports
        assert len(set(ports)) == 6
        assert all(1024 < p < lo for p in ports), (ports, lo)
    finally:
        cluster.stop_sync()
