"""``jsworker workers``: the worker directory (KV ``workers``), listed or watched live.

Entries are written by workers in any language, so nothing in them is trusted: every
field is printed through :func:`._output.safe_text` (no markup, control characters
escaped), and an entry that is not a JSON object is shown by its key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from typing import Any

import click
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from rich.text import Text

from .. import _names as n
from .._aio import raise_if_cancelling
from .._directory import list_workers
from .._errors import NotProvisionedError
from ._connect import ConnOptions, denied, denied_message, pass_conn, run, with_nc
from ._output import CLIError, console, make_table, print_json, print_json_line, safe, safe_text

DEFAULT_TTL = 60.0  # the bucket's max age as `kv setup` creates it


@click.group("workers", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def workers(ctx: click.Context, as_json: bool) -> None:
    """List live workers, of any language (KV bucket workers).

    A worker refreshes its entry every 30 s and deletes it on stop; a worker
    that died disappears when its entry expires (60 s). `workers watch` follows
    joins and leaves live.

    \b
    Examples:
      jsworker workers
      jsworker workers --json | jq -r '.[].worker_id'
      jsworker workers watch
    """
    if ctx.invoked_subcommand is not None:
        return
    conn = ctx.find_object(ConnOptions)
    assert conn is not None
    entries: list[Any] = run(with_nc(conn, list_workers))
    if as_json:
        print_json(entries)
        return
    table = make_table(Text(f"{len(entries)} live worker(s) on {conn.display_url}"))
    table.add_column("worker id", no_wrap=True)
    for col in ("task types", "groups", "partitions", "host", "pid", "lang"):
        table.add_column(col)
    table.add_column("seen", no_wrap=True, justify="right")
    now = datetime.now(UTC)
    for e in entries:
        table.add_row(*_row(e, now))
    console.print(table)


def _row(e: Any, now: datetime) -> list[Text]:
    """One table row; every cell is plain text (entries come from any process)."""
    if not isinstance(e, dict):
        return [safe_text(json.dumps(e), style="red"), *(Text("") for _ in range(7))]
    parts = e.get("partitions") or {}
    if isinstance(parts, dict):
        partitions = "; ".join(f"{k}: {v}" for k, v in parts.items()) if parts else "-"
    else:
        partitions = str(parts)
    return [
        safe_text(e.get("worker_id", "")),
        safe_text(_joined(e.get("task_types"))),
        safe_text(_joined(e.get("groups")) or "all"),
        safe_text(partitions),
        safe_text(e.get("hostname", "")),
        safe_text(e.get("pid", "")),
        # the mode a jsworker worker runs in (DagNats's Go workers have none)
        safe_text(
            f"{e.get('language', '')} ({e['engine']} mode)"
            if isinstance(e.get("engine"), str) and e["engine"]
            else e.get("language", "")
        ),
        safe_text(_ago(e.get("last_seen"), now)),
    ]


def _joined(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _ago(stamp: object, now: datetime) -> str:
    """``last_seen`` (RFC 3339) as ``12s ago``; the raw value if it does not parse."""
    try:
        seen = datetime.fromisoformat(str(stamp))
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
    except ValueError:
        return str(stamp or "")
    return f"{max(0, int((now - seen).total_seconds()))}s ago"


# ------------------------------------------------------------------ workers watch
@workers.command("watch")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option(
    "--timeout", type=click.FloatRange(0.1), help="Stop after this many seconds  [default: never]"
)
@pass_conn
def watch(conn: ConnOptions, as_json: bool, timeout: float | None) -> None:
    """Follow the worker directory live: one line per worker that is present
    at the start, joins, leaves (stopped: its entry was deleted) or expires
    (died: no refresh within the bucket's TTL, 60 s). Ctrl-C stops.

    With --json, one object per line: {"event": "present" | "joined" | "left"
    | "expired", "worker_id": ..., "at": ..., "entry": {...}}.

    \b
    Examples:
      jsworker workers watch
      jsworker workers watch --json | jq -r 'select(.event != "present") | .worker_id'
    """

    async def go(nc: NATS) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await watch_directory(nc, lambda ev: _print_event(ev, as_json))

    run(with_nc(conn, go))
    violation = denied()
    if violation:  # the watch never started: say why rather than exit 0 in silence
        raise CLIError(denied_message(violation))


def _print_event(ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json_line(ev)
        return
    style = {"present": "dim", "joined": "green", "left": "yellow", "expired": "red"}
    t = Text()
    t.append(f"{ev['at']}  ", style="dim")
    t.append(f"{ev['event']:8}", style=style.get(ev["event"], ""))
    t.append(f" {safe(ev['worker_id'])}", style="bold")
    entry = ev.get("entry")
    if isinstance(entry, dict) and ev["event"] in ("present", "joined"):
        t.append(
            f"  {safe(_joined(entry.get('task_types')))}"
            f"  [{safe(entry.get('language', '?'))} pid {safe(entry.get('pid', '?'))}"
            f" on {safe(entry.get('hostname', '?'))}]"
        )
    console.print(t, soft_wrap=True)


async def watch_directory(nc: NATS, emit: Any, *, check_every: float = 1.0) -> None:
    """Call ``emit(event)`` for each directory change until cancelled.

    KV expiry by max age leaves no marker in the stream (unless the bucket has
    subject delete markers), so a worker that died is noticed here: no update of its
    key for longer than the bucket's TTL."""
    try:
        kv: KeyValue = await nc.jetstream().key_value(n.WORKERS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.WORKERS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None
    ttl = (await kv.status()).ttl or DEFAULT_TTL
    watcher: Any = await kv.watchall()  # nats-py's KeyWatcher is untyped
    seen: dict[str, float] = {}  # key -> monotonic time of its last update
    initial = True

    def event(kind: str, key: str, entry: Any = None) -> None:
        emit({"event": kind, "worker_id": key, "at": _now(), "entry": entry})

    try:
        while True:
            # with a busy directory, a Ctrl-C that updates() swallowed ran the watch on
            raise_if_cancelling()
            try:
                update = await watcher.updates(timeout=check_every)
            except nats.errors.TimeoutError:
                update = None
                initial = False
            now = time.monotonic()
            if update is None:
                initial = False
            elif update.operation in (KV_DEL, KV_PURGE):
                if seen.pop(update.key, None) is not None:
                    event("left", update.key)
            else:
                known = update.key in seen
                seen[update.key] = now - _age(update.created)
                if not known:
                    try:
                        entry: Any = json.loads(update.value or b"")
                    except ValueError:
                        entry = None
                    event("present" if initial else "joined", update.key, entry)
            for key, last in list(seen.items()):
                if now - last > ttl:
                    del seen[key]
                    event("expired", key)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


def _age(created: object) -> float:
    """Seconds since a KV entry was written (0 when unknown)."""
    if isinstance(created, datetime):
        stamp = created if created.tzinfo else created.replace(tzinfo=UTC)
        return max(0.0, (datetime.now(UTC) - stamp).total_seconds())
    return 0.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
