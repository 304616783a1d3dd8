"""``jsworker workers`` and ``jsworker signal ...``."""

from __future__ import annotations

import json
from typing import Any

import click
from nats.aio.client import Client as NATS
from rich.markup import escape
from rich.table import Table

from .._client import Client
from .._directory import list_workers
from ._common import ConnOptions, console, pass_conn, print_json, read_json_arg, run, with_nc


@click.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_conn
def workers(conn: ConnOptions, as_json: bool) -> None:
    """List live workers (KV ``workers``, any language).

    \b
    Examples:
      jsworker workers
      jsworker workers --json | jq '.[].worker_id'
    """
    entries: list[dict[str, Any]] = run(with_nc(conn, list_workers))
    if as_json:
        print_json(entries)
        return
    table = Table(title=f"{len(entries)} live worker(s)")
    for col in ("worker id", "types", "groups", "partitions", "host", "pid", "lang", "last seen"):
        table.add_column(col)
    for e in entries:
        parts = e.get("partitions") or {}
        table.add_row(
            *(
                escape(c)
                for c in (
                    str(e.get("worker_id")),
                    ", ".join(e.get("task_types") or []),
                    ", ".join(e.get("groups") or []) or "all",
                    "; ".join(f"{k}: {v}" for k, v in parts.items()) if parts else "-",
                    str(e.get("hostname", "")),
                    str(e.get("pid", "")),
                    str(e.get("language", "")),
                    str(e.get("last_seen", "")),
                )
            )
        )
    console.print(table)


@click.group("signal")
def signal_group() -> None:
    """Send and list signals (KV ``signals``)."""


@signal_group.command("send")
@click.argument("run_id")
@click.argument("name")
@click.argument("data", required=False)
@pass_conn
def send(conn: ConnOptions, run_id: str, name: str, data: str | None) -> None:
    """Send signal NAME with DATA (JSON, - for stdin, @file) to RUN_ID.

    A handler waiting in ``ctx.wait_for_signal(NAME, timeout)`` wakes up; a signal sent
    before the wait is not missed.

    \b
    Examples:
      jsworker signal send run-1a2b3c approve '{"by": "alice"}'
      jsworker signal send run-1a2b3c resume
    """
    value = read_json_arg(data, "signal data")

    async def go(nc: NATS) -> int:
        return await Client(nc).send_signal(run_id, name, value)

    rev = run(with_nc(conn, go))
    console.print(f"signal [bold]{name}[/] sent to run [cyan]{run_id}[/] (revision {rev})")


@signal_group.command("list")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_conn
def list_(conn: ConnOptions, run_id: str, as_json: bool) -> None:
    """List the signals of RUN_ID.

    \b
    Examples:
      jsworker signal list run-1a2b3c --json
    """

    async def go(nc: NATS) -> dict[str, Any]:
        return await Client(nc).services.list_signals(run_id)

    sigs = run(with_nc(conn, go))
    if as_json:
        print_json(sigs)
        return
    table = Table(title=f"signals of {run_id}")
    table.add_column("name")
    table.add_column("data")
    for k, v in sorted(sigs.items()):
        table.add_row(escape(k), escape(json.dumps(v)))
    console.print(table)
