"""``jsworker signal send|list``: signals to running tasks (KV ``signals``)."""

from __future__ import annotations

from typing import Any

import click
from nats.aio.client import Client as NATS
from rich.text import Text

from .._client import Client
from ._connect import ConnOptions, pass_conn, run, with_nc
from ._input import read_json_arg
from ._output import compact, console, make_table, print_json


@click.group("signal")
def signal_group() -> None:
    """Send and list signals (KV bucket signals).

    \b
    Examples:
      jsworker signal send run-1a2b3c approve '{"by": "alice"}'
      jsworker signal list run-1a2b3c
    """


@signal_group.command("send")
@click.argument("run_id")
@click.argument("name")
@click.argument("data", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_conn
def send(conn: ConnOptions, run_id: str, name: str, data: str | None, as_json: bool) -> None:
    """Send signal NAME with DATA (JSON text, - for stdin, @file; default null)
    to run RUN_ID.

    A handler waiting in ctx.wait_for_signal(NAME, timeout) wakes up; a signal
    sent before the wait started is not missed. Names starting with _ are
    reserved. Sending again replaces the value.

    \b
    Examples:
      jsworker signal send run-1a2b3c approve '{"by": "alice"}'
      jsworker signal send run-1a2b3c resume
      jsworker signal send run-1a2b3c config @settings.json
    """
    value = read_json_arg(data, "signal data")

    async def go(nc: NATS) -> int:
        return await Client(nc).send_signal(run_id, name, value)

    revision = run(with_nc(conn, go))
    if as_json:
        print_json({"run_id": run_id, "name": name, "data": value, "revision": revision})
    else:
        console.print(Text(f"signal {name} sent to run {run_id} (revision {revision})"))


@signal_group.command("list")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object name -> data.")
@pass_conn
def list_(conn: ConnOptions, run_id: str, as_json: bool) -> None:
    """List the signals of run RUN_ID (including the reserved _cancel).

    \b
    Examples:
      jsworker signal list run-1a2b3c
      jsworker signal list run-1a2b3c --json | jq .approve
    """

    async def go(nc: NATS) -> dict[str, Any]:
        return await Client(nc).services.list_signals(run_id)

    signals = run(with_nc(conn, go))
    if as_json:
        print_json(signals)
        return
    if not signals:
        console.print(
            Text(f"no signals for run {run_id} (`jsworker signal send {run_id} NAME` sends one)")
        )
        return
    table = make_table(Text(f"{len(signals)} signal(s) of run {run_id}"))
    table.add_column("name")
    table.add_column("data")
    for k, v in sorted(signals.items()):
        table.add_row(Text(k), Text(compact(v)))
    console.print(table)
