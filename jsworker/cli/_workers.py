"""``jsworker workers``: the worker directory (KV ``workers``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from .._directory import list_workers
from ._connect import ConnOptions, pass_conn, run, with_nc
from ._output import console, print_json


@click.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_conn
def workers(conn: ConnOptions, as_json: bool) -> None:
    """List live workers, of any language (KV bucket workers).

    A worker refreshes its entry every 30 s and deletes it on stop; a worker
    that died disappears when its entry expires (60 s).

    \b
    Examples:
      jsworker workers
      jsworker workers --json | jq -r '.[].worker_id'
    """
    entries: list[dict[str, Any]] = run(with_nc(conn, list_workers))
    if as_json:
        print_json(entries)
        return
    table = Table(title=Text(f"{len(entries)} live worker(s) on {conn.url}"))
    table.add_column("worker id", no_wrap=True)
    for col in ("task types", "groups", "partitions", "host", "pid", "lang"):
        table.add_column(col)
    table.add_column("seen", no_wrap=True, justify="right")
    now = datetime.now(UTC)
    for e in entries:
        parts = e.get("partitions") or {}
        table.add_row(
            str(e.get("worker_id", "")),
            ", ".join(map(str, e.get("task_types") or [])),
            ", ".join(map(str, e.get("groups") or [])) or "all",
            "; ".join(f"{k}: {v}" for k, v in parts.items()) if parts else "-",
            str(e.get("hostname", "")),
            str(e.get("pid", "")),
            str(e.get("language", "")),
            _ago(e.get("last_seen"), now),
        )
    console.print(table)


def _ago(stamp: object, now: datetime) -> str:
    """``last_seen`` (RFC 3339) as ``12s ago``; the raw value if it does not parse."""
    try:
        seen = datetime.fromisoformat(str(stamp))
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
    except ValueError:
        return str(stamp or "")
    return f"{max(0, int((now - seen).total_seconds()))}s ago"
