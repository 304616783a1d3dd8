"""What a new user meets first (issue 20): `jsworker dev` with and without the demo, the
README's example beside the demo, one-line errors. Real processes, real servers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import nats
import pytest

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A ``jsworker`` subprocess whose stdout lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.t0 = time.monotonic()

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jsworker.cli",
            *args,
            env={**(env or os.environ), "COLUMNS": "200", "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for(self, pattern: str, timeout: float = 40) -> re.Match[str]:
        """The first stdout line (read so far or next) matching ``pattern``."""
        rx = re.compile(pattern)
        for line in self.lines:
            if m := rx.search(line):
                return m
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(
                self.proc.stdout.readline(), max(0.1, deadline - time.monotonic())
            )
            if not raw:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(
                    f"exited before {pattern!r}:\n" + "\n".join(self.lines) + err.decode()
                )
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if m := rx.search(line):
                return m

    async def stop(self, *, interrupt: bool = True) -> tuple[str, str]:
        if interrupt:
            self.proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(self.proc.communicate(), 40)
        self.lines += out.decode().splitlines()
        return "\n".join(self.lines), err.decode()


async def test_dev_demo_in_a_log_prints_progress_once_per_change_and_the_demos_time() -> None:
    p = await Proc.start("dev", "--demo", "--demo-tasks", "12", "--rate", "200")
    intro = await p.wait_for(r"^demo: 12 tasks")
    assert "on purpose" in intro.string  # the failures are announced as deliberate
    await p.wait_for(r"^12/12 tasks reached an outcome$")
    seen_done = time.monotonic() - p.t0
    # the demo is done and idles: two more progress periods (2 s each) pass with no
    # change, which used to print the same line again each time
    await asyncio.sleep(4.5)
    out, err = await p.stop()
    assert p.proc.returncode == 0, err
    progress = [line for line in out.splitlines() if line == "12/12 tasks reached an outcome"]
    assert len(progress) == 2, out  # one progress line, one under the final table
    m = re.search(r"demo summary: 12/12 tasks reached an outcome in ([\d.]+)s", out)
    assert m, out
    # the demo's own time (first submit to last outcome), not the process's uptime
    assert float(m.group(1)) < seen_done, (m.group(1), seen_done)


async def test_dev_without_demo_or_app_runs_a_provisioned_server_only() -> None:
    p = await Proc.start("dev")
    m = await p.wait_for(r"export NATS_URL=(nats://127\.0\.0\.1:\d+)")
    await p.wait_for(r"^server only")
    nc = await nats.connect(m.group(1))
    try:
        names = {s.config.name for s in await nc.jetstream().streams_info()}
        assert {"TASK_QUEUES", "WORKFLOW_HISTORY"} <= names  # provisioned
    finally:
        await nc.close()
    _, err = await p.stop()
    assert p.proc.returncode == 0, err
    assert "Traceback" not in err


async def test_dev_refuses_demo_and_app_together() -> None:
    p = await Proc.start("dev", "--demo", "--app", "x:y")
    _, err = await p.stop(interrupt=False)
    assert p.proc.returncode == 2 and "not both" in err


@pytest.mark.parametrize("args", [("--exit-after-demo",)])
async def test_exit_after_demo_still_needs_demo(args: tuple[str, ...]) -> None:
    p = await Proc.start("dev", *args)
    _, err = await p.stop(interrupt=False)
    assert p.proc.returncode == 2 and "--exit-after-demo needs --demo" in err


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```python\n(import asyncio.*?)```", text, re.S)
    assert m, "README's first Python example not found"
    return m.group(1)


async def test_the_readme_example_runs_beside_the_readme_demo(tmp_path: Path) -> None:
    """The two first things a user runs: the demo in one terminal, the README's example
    in another with the NATS_URL the demo printed. Neither may break the other."""
    demo = await Proc.start("dev", "--demo", "--demo-tasks", "40", "--rate", "100")
    try:
        url = (await demo.wait_for(r"export NATS_URL=(nats://\S+?)\)")).group(1)
        await demo.wait_for(r"^demo: 40 tasks")  # its worker's consumers exist now
        script = tmp_path / "example.py"
        script.write_text(_readme_example())
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env={**os.environ, "NATS_URL": url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode == 0, err.decode()
        assert out.decode().strip() == "{'sent': True}"
        await demo.wait_for(r"^40/40 tasks reached an outcome$")  # the demo was not hurt
    finally:
        _, derr = await demo.stop()
    assert demo.proc.returncode == 0, derr


CONFLICT_APP = """
import jsworker

def make_worker(nc):
    w = jsworker.Worker(nc, groups=["cpu"])
    w.handle("send-email", lambda ctx: None)
    return w
"""


async def test_a_consumer_conflict_is_one_line_naming_the_other_consumer(
    tmp_path: Path,
) -> None:
    """The demo serves send-email without groups; a grouped worker of send-email cannot
    share it (a work-queue stream). `serve` says so once, in one line, naming the
    consumer in the way and what to do."""
    demo = await Proc.start("dev", "--demo", "--demo-tasks", "4", "--rate", "100")
    try:
        url = (await demo.wait_for(r"export NATS_URL=(nats://\S+?)\)")).group(1)
        await demo.wait_for(r"^demo: 4 tasks")
        (tmp_path / "clash_app.py").write_text(CONFLICT_APP)
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jsworker.cli",
            "serve",
            "clash_app:make_worker",
            "--app-dir",
            str(tmp_path),
            env={**os.environ, "NATS_URL": url, "COLUMNS": "400", "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out_b, err_b = await asyncio.wait_for(p.communicate(), 60)
    finally:
        await demo.stop()
    err = err_b.decode()
    assert p.returncode == 1
    assert "Traceback" not in err + out_b.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # once, not logged and then raised
    assert lines[0].startswith("Error: cannot create consumer 'send-email__g_cpu'")
    assert "'send-email' (filter 'task.send-email.>')" in lines[0]
    assert "a worker without groups takes every task of this type" in lines[0]


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("task.t.>", "task.t.cpu.>", True),
        ("task.t.cpu.>", "task.t.gpu.>", False),
        ("task.t.*.x", "task.t.cpu.>", True),
        ("task.t.a", "task.t.a.b", False),
        ("task.t.a", "task.t.a", True),
        ("task.t1.>", "task.t.>", False),
        (">", "task.x", True),
    ],
)
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    from jsworker._handler import filters_overlap

    assert filters_overlap(a, b) is overlap
    assert filters_overlap(b, a) is overlap


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess

    p = subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "NATS_URL": "nats://127.0.0.1:1", "NO_COLOR": "1", **(env or {})},
        timeout=60,
        check=False,
    )
    return p.returncode, p.stdout, p.stderr


def test_an_import_error_shows_the_users_frames_only(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("import helper_mod\n")
    (tmp_path / "helper_mod.py").write_text("def f():\n    raise RuntimeError('boom')\n\nf()\n")
    rc, _, err = _cli("serve", "broken_app:worker", cwd=tmp_path)
    assert rc == 1
    assert "Traceback" in err and "RuntimeError: boom" in err
    frames = re.findall(r'File "([^"]+)"', err)
    assert frames == [str(tmp_path / "broken_app.py"), *[str(tmp_path / "helper_mod.py")] * 2]
    assert "importlib" not in err and "jsworker" not in err.replace("'broken_app:worker'", "")


def test_a_target_that_is_not_a_worker_reads_as_english(tmp_path: Path) -> None:
    (tmp_path / "intapp.py").write_text("worker = 5\nname = 'x'\n")
    rc, _, err = _cli("serve", "intapp:worker", cwd=tmp_path)
    assert rc == 1 and "the target is an int;" in err, err
    rc, _, err = _cli("serve", "intapp:name", cwd=tmp_path)
    assert rc == 1 and "the target is a str;" in err, err


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:4222", "http:// is not a NATS scheme): use nats://127.0.0.1:4222"),
        ("https://example.test:443", "use tls://example.test:443"),
        ("nats://no-such-host.invalid:4222", "the host name 'no-such-host.invalid' does not"),
        ("nats://127.0.0.1:1", "(is it running? set --url or NATS_URL; `jsworker dev`"),
    ],
)
def test_connection_errors_are_one_line_and_the_same_for_repl(
    url: str, says: str, tmp_path: Path
) -> None:
    lines = []
    for args in (("--url", url, "queues"), ("repl", "--url", url, "--no-banner")):
        rc, out, err = _cli(*args, cwd=tmp_path)
        assert rc == 1, (args, out, err)
        got = [line for line in err.splitlines() if line.strip()]
        assert len(got) == 1 and says in got[0], (args, err)
        lines.append(got[0])
    assert lines[0] == lines[1]  # the REPL says exactly what every other command says


SERVE_APP = """
import jsworker

def make_worker(nc):
    w = jsworker.Worker(nc)
    w.handle("first-hour-serve", lambda ctx: None)
    return w
"""


def test_serve_in_a_terminal_ctrl_c_on_its_own_line_and_one_final_status(
    tmp_path: Path,
) -> None:
    """A real pty read through a terminal emulator (pyte): what the person sees after
    Ctrl-C is the serving line, the stop message on a line of its own, and one status
    line (the live line's last frame), not the live line and then a copy of it."""
    import io

    import pexpect
    import pyte

    from jsworker import EmbeddedServer

    (tmp_path / "first_hour_app.py").write_text(SERVE_APP)
    loop = asyncio.new_event_loop()
    srv = EmbeddedServer(store_dir=str(tmp_path / "store"))
    loop.run_until_complete(srv.start())
    try:

        async def provision() -> None:
            import jsworker

            nc = await nats.connect(srv.url)
            await jsworker.setup_all(nc)
            await nc.close()

        loop.run_until_complete(provision())
        env = {**os.environ, "NATS_URL": srv.url, "TERM": "xterm"}
        env.pop("NO_COLOR", None)
        p = pexpect.spawn(
            sys.executable,
            ["-m", "jsworker.cli", "serve", "first_hour_app:make_worker"],
            cwd=str(tmp_path),
            env=env,
            encoding="utf-8",
            timeout=40,
            dimensions=(30, 160),
        )
        p.logfile_read = seen = io.StringIO()
        p.expect("Ctrl-C stops")
        p.expect("up 1s")  # the live status line is drawing
        p.sendcontrol("c")
        p.expect(pexpect.EOF)
        p.close()
    finally:
        loop.run_until_complete(srv.stop())
        loop.close()
    screen = pyte.Screen(160, 30)
    pyte.Stream(screen).feed(seen.getvalue().replace("\n", "\r\n").replace("\r\r", "\r"))
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert p.exitstatus == 0, lines
    stop = [i for i, line in enumerate(lines) if "stopping, letting in-flight" in line]
    assert len(stop) == 1, lines
    assert lines[stop[0]].startswith("SIGINT: stopping"), lines  # at the start of a line
    status = [line for line in lines if " in flight " in line]
    assert len(status) == 1, lines  # the final status, once
    assert status[0].lstrip("●✖ ").startswith("worker-"), lines
