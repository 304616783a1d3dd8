"""``jsworker serve``: import a worker (uvicorn-style ``module:attr``) and run it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import click
from nats.aio.client import Client as NATS
from rich.live import Live
from rich.text import Text

from .._dagnats import ENGINE_ENV, ENGINES
from .._loop import LOOPS, resolve_loop
from .._worker import Worker
from ._connect import ConnOptions, library_errors, pass_conn, run
from ._importer import build_worker, check_target, import_from_string, needs_connection
from ._otel import otel_console_option, otel_session
from ._output import console, err

PLAIN_EVERY = 5.0  # seconds between status lines when stdout is not a terminal

_Handler = Callable[[int, FrameType | None], Any] | int | None


class ShutdownSignals:
    """SIGINT/SIGTERM while a command runs: the first sets :attr:`stop`, the second
    calls ``on_force`` and exits at once (status 130).

    Installed only by the CLI, never by the library; the previous handlers are restored
    on exit, so an embedding program (or a test's CliRunner) gets its own back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_force: Callable[[], None] | None = None) -> None:
        self.stop = asyncio.Event()
        self.hits = 0
        self._on_force = on_force
        self._previous: dict[int, _Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # how to say "stopping": stderr, unless a live display owns the terminal (then
        # it prints above the display, on a line of its own)
        self.say: Callable[[str, str], None] = lambda text, style: err(text, style=style)

    def __enter__(self) -> ShutdownSignals:
        self._loop = asyncio.get_running_loop()
        for s in self.SIGNALS:
            self._previous[s] = signal.getsignal(s)
            self._loop.add_signal_handler(s, self._on_signal, s)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._loop is not None
        for s, previous in self._previous.items():
            self._loop.remove_signal_handler(s)
            signal.signal(s, previous)

    def _on_signal(self, signum: int) -> None:
        self.hits += 1
        if self.hits == 1:
            self.say(
                f"{signal.Signals(signum).name}: stopping, letting in-flight tasks finish "
                "(send it again to force)",
                "yellow",
            )
            self.stop.set()
            return
        err("forced exit: in-flight tasks go back to the queue after their AckWait")
        if self._on_force is not None:
            self._on_force()
        # os._exit: a graceful stop is hanging; unwinding could hang the same way
        os._exit(130)

    async def sleep(self, seconds: float) -> None:
        """Sleep, returning early when a stop was requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)


def status_text(worker: Worker, started: float) -> Text:
    """``● worker-… done 12  failed 1  dead 0  in flight 3  up 42s``; a failed worker
    shows its error instead of a green dot, and background loop restarts are counted."""
    s = worker.stats
    h = worker.health
    up = time.monotonic() - started
    t = Text()
    if h.fatal:
        t.append("✖ ", style="bold red")
    else:
        t.append("● ", style="green" if worker.running and not h.loop_failures else "yellow")
    t.append(f"{worker.worker_id}  ", style="bold")
    t.append(f"done {s.completed}  ", style="green")
    t.append(f"failed {s.failed}  ", style="yellow")
    t.append(f"dead {s.dead}  ", style="red")
    t.append(f"in flight {worker.in_flight}  ")
    if h.loop_failures:
        t.append(f"restarts {h.loop_failures}  ", style="yellow")
    t.append(f"up {up:.0f}s", style="dim")
    if h.fatal:
        t.append(f"  FAILED: {h.fatal}", style="red")
    return t


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop running now."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


async def serve_worker(
    worker: Worker,
    *,
    grace: float | None,
    url: str,
    signals: ShutdownSignals,
) -> None:
    """Start ``worker``, show its status until ``signals`` asks to stop or the worker
    fails, then stop it gracefully. (The caller installs ``signals`` before connecting,
    so a SIGTERM that arrives while starting up is not lost either.) A worker that
    fails raises :class:`WorkerFailedError` here, which makes ``serve`` exit 1, so a
    process supervisor restarts it instead of a process that serves nothing."""
    await worker.start()
    runner = asyncio.create_task(worker.run())
    started = time.monotonic()
    console.print(
        Text.assemble(
            ("serving ", "bold"),
            ", ".join(worker.task_types) or "(no handlers yet)",
            f" on {url} as {worker.worker_id}, ",
            (f"{worker.engine} mode", "bold cyan" if worker.engine == "dagnats" else ""),
            f", {loop_name()} loop (Ctrl-C stops)",
        ),
        soft_wrap=True,
    )

    def going() -> bool:
        return not signals.stop.is_set() and not runner.done()

    shown = False  # the final status is on screen (the live line's last frame)
    try:
        if console.is_terminal:
            with Live(status_text(worker, started), console=console, refresh_per_second=4) as live:
                signals.say = lambda text, style: live.console.print(
                    Text(text, style=style), soft_wrap=True
                )
                try:
                    while going():
                        await signals.sleep(0.25)
                        live.update(status_text(worker, started))
                    # the stop drains under the live line, which then stays as the last
                    # status (printed once, not once more below it)
                    stopping = asyncio.create_task(_stop(worker, runner, grace))
                    while not stopping.done():
                        await asyncio.wait({stopping}, timeout=0.25)
                        live.update(status_text(worker, started))
                    await stopping
                    shown = True
                finally:
                    signals.say = lambda text, style: err(text, style=style)
        else:
            last = time.monotonic()
            while going():
                await signals.sleep(0.25)
                if time.monotonic() - last >= PLAIN_EVERY:
                    last = time.monotonic()
                    console.print(status_text(worker, started), soft_wrap=True)
    finally:
        if not shown:
            await _stop(worker, runner, grace)
            console.print(status_text(worker, started), soft_wrap=True)
    await runner  # raises WorkerFailedError when the worker failed


async def _stop(worker: Worker, runner: asyncio.Task[None], grace: float | None) -> None:
    if not runner.done():
        await worker.stop(grace)


@click.command("serve")
@click.argument("target")
@click.option(
    "--app-dir",
    default=".",
    type=click.Path(file_okay=False),
    help="Directory put first on sys.path before importing TARGET.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=None,
    help="Seconds in-flight tasks get to finish on stop  [default: the Worker's grace_period]",
)
@click.option(
    "--loop",
    "loop_name",
    type=click.Choice(LOOPS),
    default="auto",
    show_default=True,
    help="Event loop: auto uses uvloop when it is installed (pip install 'jsworker[fast]').",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=None,
    help="standalone (jsworker's own contract), dagnats (a DagNats engine drives the "
    "worker: docs/dagnats.md) or auto (dagnats when the server has DagNats's streams) "
    "[default: $JSWORKER_ENGINE, else auto; overrides the app's choice]",
)
@otel_console_option
@pass_conn
def serve(
    conn: ConnOptions,
    target: str,
    app_dir: str,
    grace: float | None,
    loop_name: str,
    engine: str | None,
    otel_console: bool,
) -> None:
    """Run the worker TARGET (module:attr) until Ctrl-C or SIGTERM.

    TARGET names, in an importable module (attr may be dotted):

    \b
    * a factory (preferred): a function, sync or async, taking the NATS
      client the CLI connected (--url, --creds, ...) and returning a Worker;
    * a jsworker.Worker instance: the module builds it on a client of its
      own, not connected yet (nats.aio.client.Client()); the CLI connects
      that client with its options.

    Shows done / failed / dead / in-flight counts (a plain line every 5 s when
    stdout is not a terminal). The first Ctrl-C or SIGTERM stops fetching and
    lets in-flight tasks finish within --grace; a second one exits at once.

    OpenTelemetry (spans per task, metrics) is switched on by the standard
    OTEL_* variables (OTLP: pip install 'jsworker[otel]') or --otel-console.

    \b
    Examples:
      # myapp/tasks.py (factory)
      #   import jsworker
      #   def make_worker(nc):
      #       w = jsworker.Worker(nc)
      #       @w.handle("send-email")
      #       async def send_email(ctx):
      #           return {"sent": ctx.json()["to"]}
      #       return w
      jsworker serve myapp.tasks:make_worker
      NATS_URL=nats://nats:4222 jsworker serve myapp.tasks:make_worker --grace 30
      jsworker serve tasks:make_worker --app-dir src
      jsworker serve myapp.tasks:make_worker --loop uvloop   # fail if not installed
      jsworker serve steps:make_worker --engine dagnats      # steps of DagNats workflows
    \b
      # myapp/instance.py (instance on the module's own client)
      #   import jsworker
      #   from nats.aio.client import Client
      #   worker = jsworker.Worker(Client())
      #   worker.handle("ping", lambda ctx: "pong")
      jsworker serve myapp.instance:worker
    """
    with library_errors():
        _, loop_factory = resolve_loop(loop_name)
    if engine is not None:
        os.environ[ENGINE_ENV] = engine  # a Worker the app builds takes it from there
    sys.path.insert(0, os.path.abspath(app_dir))
    obj = import_from_string(target)
    check_target(obj)

    async def main() -> None:
        with (
            ShutdownSignals() as signals,
            otel_session(console=otel_console, service="jsworker-serve") as telemetry,
        ):
            nc: NATS | None = None
            if needs_connection(obj):
                nc = await conn.connect(long_running=True, name="jsworker-serve")
            worker: Worker | None = None
            try:
                worker = await build_worker(obj, nc, conn)
                if engine is not None and worker.engine_setting != engine:
                    # the app chose an engine in code; the command line wins
                    worker.engine_setting = worker.engine = engine
                if not worker.task_types:
                    raise click.ClickException(
                        f"{target} has no handlers: nothing to serve (register one with "
                        "@worker.handle(...) before returning the worker)"
                    )
                if telemetry is not None:
                    worker.telemetry.enable(telemetry.tracer_provider, telemetry.meter_provider)
                await serve_worker(worker, grace=grace, url=conn.display_url, signals=signals)
            finally:
                for client in {c for c in (nc, worker.nc if worker else None) if c is not None}:
                    try:
                        await client.close()
                    except Exception as e:  # a connection the server dropped (uvloop)
                        err(f"closing the connection: {type(e).__name__}: {e}", style="dim")

    run(main(), loop_factory=loop_factory)
