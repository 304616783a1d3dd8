"""The real DagNats as a test peer: its binaries, its engine process, its CLI.

The binaries come from ``go install github.com/danmestas/dagnats/cmd/...@v0.0.12``
(``.ci/run`` tries it; ``$DAGNATS_BIN`` names another directory holding ``dagnats`` and
``dagnats-engine``). The Go peer worker (``tests/dagnats_peer``, DagNats's own worker
package serving one task type) is built with ``go build``; ``$DAGNATS_SRC`` points it
at a checkout of DagNats instead of the module proxy. Tests that need a piece that is
not there are skipped with the exact reason; nothing here fakes DagNats.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy

HERE = Path(__file__).parent
PEER_SRC = HERE / "dagnats_peer"
VERSION = "v0.0.12"


def _go_bin() -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    out = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, check=False)
    path = out.stdout.strip().split(os.pathsep)[0]
    return Path(path) / "bin" if path else None


def find_bin(name: str) -> str | None:
    """``name`` from ``$DAGNATS_BIN``, ``$PATH`` or ``$(go env GOPATH)/bin``."""
    for d in filter(None, [os.environ.get("DAGNATS_BIN")]):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    gobin = _go_bin()
    if gobin is not None and (gobin / name).is_file():
        return str(gobin / name)
    return None


def require_bins() -> tuple[str, str]:
    engine, cli = find_bin("dagnats-engine"), find_bin("dagnats")
    if engine is None or cli is None:
        pytest.skip(
            f"DagNats {VERSION} binaries not found (dagnats-engine, dagnats): "
            f"`go install github.com/danmestas/dagnats/cmd/...@{VERSION}` (see .ci/run) "
            "or set DAGNATS_BIN"
        )
    return engine, cli


_peer: list[str | None] = []


def peer_bin() -> str:
    """The Go peer worker, built once per session (skip when it cannot be built)."""
    if _peer:
        if _peer[0] is None:
            pytest.skip("the DagNats Go peer worker could not be built (see the first skip)")
        return _peer[0]
    given = os.environ.get("DAGNATS_PEER")
    if given:
        _peer.append(given)
        return given
    go = shutil.which("go")
    if go is None:
        _peer.append(None)
        pytest.skip("no `go` on PATH: the DagNats Go peer worker cannot be built")
    out_dir = Path(tempfile.mkdtemp(prefix="dagnats-peer-"))
    out = out_dir / "dagnats-peer"
    cmd = [go, "build", "-o", str(out)]
    env = dict(os.environ, GOFLAGS="-mod=mod")
    src = os.environ.get("DAGNATS_SRC")
    if src:
        modfile = out_dir / "go.mod"
        modfile.write_text(
            (PEER_SRC / "go.mod").read_text() + f"\nreplace github.com/danmestas/dagnats => {src}\n"
        )
        cmd.insert(2, f"-modfile={modfile}")
    res = subprocess.run(cmd, cwd=PEER_SRC, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        _peer.append(None)
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the DagNats Go peer worker could not be built: {last}")
    _peer.append(str(out))
    return str(out)


class Engine:
    """A ``dagnats-engine`` process on a server, and the ``dagnats`` CLI against it."""

    def __init__(self, url: str, engine_bin: str, cli_bin: str) -> None:
        self.url = url
        self.engine_bin = engine_bin
        self.cli_bin = cli_bin
        self.proc: subprocess.Popen[str] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="dagnats-wf-"))
        self.env = dict(os.environ, DAGNATS_NATS_URL=url)
        self.env.pop("NATS_URL", None)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.engine_bin],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # it prints this once its streams exist
            seen.append(line)
            if "dagnats-engine started" in line:
                break
        else:
            raise RuntimeError("dagnats-engine exited:\n" + "".join(seen))
        # keep reading its log (kept for failure messages) so it never blocks on a pipe
        self.log = seen
        self._drain = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._drain.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._drain.join(10)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [self.cli_bin, *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and res.returncode != 0:
            raise AssertionError(f"dagnats {' '.join(args)} failed: {res.stdout}{res.stderr}")
        return res

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def register(self, workflow: dict[str, Any]) -> None:
        path = self.tmp / f"{workflow['name']}.json"
        path.write_text(json.dumps(workflow))
        self.cli("workflow", "register", str(path))

    def start_run(self, name: str, data: Any = None) -> str:
        out = self.cli_json("run", "start", name, json.dumps({} if data is None else data))
        return str(out["run_id"])

    def status(self, run_id: str) -> dict[str, Any]:
        return dict(self.cli_json("run", "status", run_id))


def engine_for(url: str) -> Iterator[Engine]:
    engine_bin, cli_bin = require_bins()
    eng = Engine(url, engine_bin, cli_bin)
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


TERMINAL = frozenset({"completed", "failed", "cancelled", "compensated", "compensate_failed"})


async def wait_run(
    nc: nats.NATS, run_id: str, statuses: frozenset[str] = TERMINAL, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait (on the engine's KV ``workflow_runs`` entry, no polling) until the run's
    status is one of ``statuses``; return the record."""
    kv = await nc.jetstream().key_value("workflow_runs")
    watcher = await kv.watch(f"run.{run_id}")
    last: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    entry = await watcher.updates(timeout=timeout)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None or not entry.value:
                    continue
                last = json.loads(entry.value)
                if last.get("status") in statuses:
                    return last
    except TimeoutError:
        raise AssertionError(f"run {run_id} still {last.get('status')!r}: {last}") from None
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def wait_step(
    nc: nats.NATS, run_id: str, step_id: str, status: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait until step ``step_id`` of the run has ``status`` in the engine's record."""
    kv = await nc.jetstream().key_value("workflow_runs")
    watcher = await kv.watch(f"run.{run_id}")
    try:
        async with asyncio.timeout(timeout):
            while True:
                entry = await watcher.updates(timeout=timeout)  # type: ignore[no-untyped-call]
                if entry is None or not entry.value:
                    continue
                run = json.loads(entry.value)
                if run.get("steps", {}).get(step_id, {}).get("status") == status:
                    return dict(run)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


def step_output(state: dict[str, Any]) -> Any:
    """A step's output in the engine's record (Go marshals ``[]byte`` as base64)."""
    raw = state.get("output")
    if raw is None:
        return None
    try:
        return json.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, TypeError):
        return raw


async def history(nc: nats.NATS, run_id: str) -> list[dict[str, Any]]:
    """Every event of the run on ``history.{run_id}``, in order."""
    js = nc.jetstream()
    info = await js.stream_info("WORKFLOW_HISTORY", subjects_filter=f"history.{run_id}")
    total = (info.state.subjects or {}).get(f"history.{run_id}", 0)
    sub = await js.subscribe(
        f"history.{run_id}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    out = []
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=5)
            out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return out


def started_counts(events: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """How many times each (step, attempt) was started."""
    out: dict[tuple[str, int], int] = {}
    for e in events:
        if e["type"] == "step.started":
            k = (e["step_id"], e.get("attempt_number", 0))
            out[k] = out.get(k, 0) + 1
    return out
