"""``jsworker serve``: import a worker (uvicorn-style ``module:attr``) and run it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import click
from nats.aio.client import Client as NATS
from rich.live import Live
from rich.text import Text

from .._worker import Worker
from ._common import ConnOptions, console, err_console, pass_conn, run


class ImportFromStringError(click.ClickException):
    pass


def import_from_string(target: str) -> Any:
    """``pkg.module:attr`` (attr may be dotted) -> the object.

    A module that is missing gives a one-line error; an ImportError raised *inside* the
    user's module is not hidden: its traceback is printed (uvicorn's behaviour)."""
    module_name, sep, attrs = target.partition(":")
    if not sep or not module_name or not attrs:
        raise ImportFromStringError(
            f"import string {target!r} must be in format '<module>:<attribute>', "
            "e.g. myapp.tasks:worker"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise  # a nested import failed: show the real error
        raise ImportFromStringError(
            f"could not import module {module_name!r} (is it on the path? see --app-dir)"
        ) from None
    obj: Any = module
    try:
        for part in attrs.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportFromStringError(
            f"attribute {attrs!r} not found in module {module_name!r}"
        ) from None
    return obj


async def build_worker(target: Any, nc: NATS) -> Worker:
    """A Worker instance, or a factory ``(nc) -> Worker`` (sync or async)."""
    if isinstance(target, Worker):
        return target
    if callable(target):
        made = target(nc)
        if inspect.isawaitable(made):
            made = await made
        if isinstance(made, Worker):
            return made
        raise click.ClickException(
            f"the factory returned {type(made).__name__}, not a jsworker.Worker"
        )
    raise click.ClickException(
        f"the target is a {type(target).__name__}; expected a jsworker.Worker or a factory "
        "function taking the NATS connection and returning one"
    )


def status_text(worker: Worker, started: float) -> Text:
    s = worker.stats
    up = time.monotonic() - started
    t = Text()
    t.append("● ", style="green" if worker.running else "yellow")
    t.append(f"{worker.worker_id}  ", style="bold")
    t.append(f"done {s.completed}  ", style="green")
    t.append(f"retried {s.failed}  ", style="yellow")
    t.append(f"dead {s.dead}  ", style="red")
    t.append(f"in flight {worker.in_flight}  ")
    t.append(f"up {up:.0f}s  {s.completed / up if up > 0 else 0:.0f}/s", style="dim")
    return t


async def serve_worker(
    worker: Worker, *, grace: float | None, on_tick: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Start ``worker``, show its status until SIGINT/SIGTERM, then stop gracefully.

    Signal handlers are installed here (never by the library) and the previous ones
    restored on the way out; a second signal forces the exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hits = 0

    def on_signal() -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            err_console.print(
                "[yellow]stopping: finishing in-flight tasks (press Ctrl-C again to force)[/]"
            )
            stop.set()
        else:
            err_console.print("[red]forced exit[/]")
            os._exit(130)

    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        loop.add_signal_handler(s, on_signal)
    try:
        await worker.start()
        started = time.monotonic()
        if console.is_terminal:
            with Live(
                status_text(worker, started), console=console, refresh_per_second=4, transient=False
            ) as live:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.25)
                    live.update(status_text(worker, started))
                    if on_tick is not None:
                        await on_tick()
        else:
            console.print(f"worker {worker.worker_id} serving {', '.join(worker.task_types)}")
            last = 0.0
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
                if on_tick is not None:
                    await on_tick()
                if time.monotonic() - last >= 5:
                    last = time.monotonic()
                    console.print(status_text(worker, started))
        await worker.stop(grace)
        console.print(status_text(worker, started))
    finally:
        for s in sigs:
            loop.remove_signal_handler(s)
            signal.signal(s, previous[s])


@click.command("serve")
@click.argument("target")
@click.option(
    "--app-dir",
    default=".",
    show_default=True,
    help="Directory added to sys.path before importing TARGET.",
)
@click.option(
    "--grace",
    type=float,
    default=None,
    help="Seconds in-flight tasks get on stop (default: the worker's grace_period).",
)
@pass_conn
def serve(conn: ConnOptions, target: str, app_dir: str, grace: float | None) -> None:
    """Run the worker TARGET (``module:attr``) until Ctrl-C / SIGTERM.

    TARGET is a factory taking the NATS connection and returning a jsworker.Worker
    (preferred: the CLI owns the connection), sync or async, or a Worker instance.
    The first Ctrl-C stops gracefully; a second forces the exit.

    \b
    Examples:
      # myapp/tasks.py
      #   import jsworker
      #   def make_worker(nc):
      #       w = jsworker.Worker(nc)
      #       @w.handle("send-email")
      #       async def send_email(ctx):
      #           return {"sent": True}
      #       return w
      jsworker serve myapp.tasks:make_worker
      NATS_URL=nats://nats:4222 jsworker serve myapp.tasks:make_worker --grace 30
    """
    sys.path.insert(0, os.path.abspath(app_dir))
    try:
        target_obj = import_from_string(target)
    except ImportFromStringError:
        raise
    except Exception:
        err_console.print(f"[red]error while importing {target!r}:[/]")
        traceback.print_exc()
        sys.exit(1)

    async def main() -> None:
        nc = await conn.connect(reconnect=True, name="jsworker-serve")
        try:
            worker = await build_worker(target_obj, nc)
            await serve_worker(worker, grace=grace)
        finally:
            await nc.close()

    run(main())
