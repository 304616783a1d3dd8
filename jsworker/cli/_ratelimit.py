"""``jsworker ratelimit show|reset``: the token buckets of KV ``rate_limits``.

Buckets are written by workers in any language, so a value that is not a valid bucket
is listed as such, and every field is printed as plain text."""

from __future__ import annotations

from typing import Any

import click
from nats.aio.client import Client as NATS
from rich.text import Text

from .. import _names as n
from .._ratelimit import GLOBAL_KEY, list_buckets, reset_buckets
from ._connect import ConnOptions, library_errors, pass_conn, run, with_nc
from ._output import console, err, make_table, print_json, safe_text


@click.group("ratelimit")
def ratelimit_group() -> None:
    """Rate-limit buckets (KV bucket rate_limits), shared by every worker.

    A handler declares its limits (rate_limit=, key_rate_limit=); the bucket
    of a task type or key is created full on its first task.

    \b
    Examples:
      jsworker ratelimit show send-sms
      jsworker ratelimit show call-crm --json | jq '.[] | select(.tokens < 1)'
      jsworker ratelimit reset send-sms
      jsworker ratelimit reset call-crm acme
    """


@ratelimit_group.command("show")
@click.argument("task_type")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_conn
def show(conn: ConnOptions, task_type: str, as_json: bool) -> None:
    """Show the buckets of TASK_TYPE: the global one (key "-") and one per key,
    with the tokens they hold now (refilled to this moment; reading changes
    nothing).

    \b
    Examples:
      jsworker ratelimit show send-sms
      jsworker ratelimit show call-crm --json
    """
    with library_errors():
        n.validate_task_type(task_type)

    async def go(nc: NATS) -> list[dict[str, Any]]:
        return await list_buckets(nc.jetstream(), task_type)

    buckets = run(with_nc(conn, go))
    if as_json:
        print_json(buckets)
        return
    if not buckets:
        err(f"no rate-limit buckets for {task_type}", style="yellow")
        return
    table = make_table(Text(f"rate-limit buckets of {task_type}"))
    table.add_column("key", no_wrap=True)
    for col in ("tokens", "limit", "per (s)", "rate (/s)"):
        table.add_column(col, justify="right")
    for b in buckets:
        key = "-" if b["key"] is None else str(b["key"])
        if "error" in b:
            table.add_row(safe_text(key), safe_text(b["error"], style="red"), "", "", "")
            continue
        table.add_row(
            safe_text(key),
            f"{b['tokens']:g}",
            str(b["limit"]),
            f"{b['per']:g}",
            f"{b['limit'] / b['per']:g}",
        )
    console.print(table)


@ratelimit_group.command("reset")
@click.argument("task_type")
@click.argument("key", required=False)
@pass_conn
def reset(conn: ConnOptions, task_type: str, key: str | None) -> None:
    """Reset the buckets of TASK_TYPE (all of them, or only KEY's; KEY "_global"
    is the global bucket). The next task finds a full bucket.

    \b
    Examples:
      jsworker ratelimit reset send-sms
      jsworker ratelimit reset call-crm acme
      jsworker ratelimit reset call-crm _global
    """
    with library_errors():
        n.validate_task_type(task_type)
    if key is not None and not key:
        raise click.BadParameter("KEY must not be empty", param_hint="KEY")

    async def go(nc: NATS) -> int:
        return await reset_buckets(nc.jetstream(), task_type, key)

    deleted = run(with_nc(conn, go))
    what = "bucket" if deleted == 1 else "buckets"
    scope = "" if key is None else f" (key {'global' if key == GLOBAL_KEY else key})"
    console.print(safe_text(f"reset {deleted} {what} of {task_type}{scope}"))
