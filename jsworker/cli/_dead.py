"""``jsworker dead ...``: list, show, replay and purge dead letters (``DEAD_LETTERS``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from nats.aio.client import Client as NATS
from rich.json import JSON
from rich.text import Text

from .. import _names as n
from .._dead import DeadLetter, ReplayResult, get_dead, list_dead, purge_dead, replay_dead
from ._connect import ConnOptions, library_errors, pass_conn, run, with_nc
from ._output import CLIError, compact, console, make_table, print_json, safe, safe_text

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """``90`` (seconds), ``30s``, ``5m``, ``1h30m``, ``7d``, ``2w`` -> seconds."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pos, total = 0, 0.0
        for m in _PART.finditer(t):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(
                f"{text!r} is not a duration (use e.g. 90, 30s, 5m, 1h30m, 7d, 2w)"
            ) from None
        return total
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a duration (must be a finite number >= 0)")
    return value


if TYPE_CHECKING:
    _ParamType = click.ParamType[float]
else:  # click < 8.2: ParamType is not generic at run time
    _ParamType = click.ParamType


class DurationType(_ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as e:
            # a bad value is bad input, not a usage error: one line, exit 1
            raise CLIError(f"{param.opts[0] if param else 'duration'}: {e}") from None


DURATION = DurationType()


def _first_line(s: str, width: int = 80) -> str:
    line = s.strip().splitlines()[0] if s.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _when(stamp: str, now: datetime) -> str:
    """``2026-11-29 13:01:02 (3m ago)``; the raw value if it does not parse."""
    try:
        t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
    except ValueError:
        return stamp
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S} ({_ago((now - t).total_seconds())})"


def _lines(text: str, style: str = "") -> None:
    """A multi-line wire string (an error, a traceback), line by line, each line made
    terminal-safe (control characters escaped, never markup)."""
    for line in text.splitlines() or [""]:
        console.print(safe_text(line, style=style), soft_wrap=True)


def _age_of(stamp: str, now: datetime) -> str:
    try:
        t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return _ago((now - t).total_seconds()).removesuffix(" ago")


def _ago(s: float) -> str:
    s = max(0.0, s)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


@click.group("dead")
def dead_group() -> None:
    """Dead letters: tasks that failed for good (stream DEAD_LETTERS).

    \b
    Examples:
      jsworker dead list --since 1h
      jsworker dead show 42
      jsworker dead replay 42
      jsworker dead replay --type send-email --all --dry-run
      jsworker dead purge --type send-email --older-than 7d
    """


@dead_group.command("list")
@click.option("--type", "task_type", help="Only dead letters of this task type.")
@click.option("--since", type=DURATION, help="Only the last DURATION (30m, 1h, 7d).")
@click.option("--limit", type=click.IntRange(1), help="Only the newest N.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (full records).")
@pass_conn
def dead_list(
    conn: ConnOptions,
    task_type: str | None,
    since: float | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first: sequence, type (/group), run, kind,
    attempts, age and the first line of the error.

    \b
    Examples:
      jsworker dead list
      jsworker dead list --type send-email --since 1h
      jsworker dead list --json | jq -r '.[] | select(.kind == "exhausted") | .seq'
    """
    with library_errors():
        if task_type is not None:
            n.validate_task_type(task_type)
    dls = run(
        with_nc(
            conn,
            lambda nc: list_dead(
                nc, task_type=task_type, since=since if since else None, limit=limit
            ),
        )
    )
    if as_json:
        print_json([d.as_dict() for d in dls])
        return
    what = f"{len(dls)} dead letter(s)" + (f" of {task_type}" if task_type else "")
    table = make_table(Text(what))
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("run", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("att", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    # the one wrapable column: rich narrows it first; its cells are cut, not wrapped
    table.add_column("error", min_width=12)
    now = datetime.now(UTC)
    for d in dls:
        table.add_row(
            str(d.seq),
            safe_text(d.task_type + (f"/{d.group}" if d.group else "")),
            safe_text(d.run_id or "-"),
            safe_text(d.kind, style="red" if d.kind != "exhausted" else "yellow"),
            str(d.attempts),
            _age_of(d.timestamp, now),
            Text(safe(_first_line(d.error or "", 200)), no_wrap=True, overflow="ellipsis"),
        )
    console.print(table)


@dead_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
@pass_conn
def dead_show(conn: ConnOptions, ref: str, as_json: bool) -> None:
    """Show one dead letter by REF: its stream sequence or its run id (the newest
    record of that run). The input is pretty-printed; the traceback is shown if
    there is one; an invalid payload is shown decoded when it is text.

    \b
    Examples:
      jsworker dead show 42
      jsworker dead show run-6f1c2a9e0b7d4c3e8a21 --json
    """
    dl: DeadLetter = run(with_nc(conn, lambda nc: get_dead(nc, ref)))
    if as_json:
        print_json(dl.as_dict())
        return
    now = datetime.now(UTC)
    rows: list[tuple[str, str]] = [
        ("seq", str(dl.seq)),
        ("subject", dl.subject),
        ("type", dl.task_type),
        ("group", dl.group or "-"),
        ("run", dl.run_id or "-"),
        ("step", dl.step_id or "-"),
        ("iteration", str(dl.iteration)),
        ("kind", dl.kind),
        ("attempts", str(dl.attempts)),
        ("worker", dl.worker_id or "-"),
        ("time", _when(dl.timestamp, now)),
        ("task subject", dl.task_subject or "-"),
    ]
    for k, v in rows:
        console.print(Text.assemble((f"{k:>13}: ", "bold"), safe(v)), soft_wrap=True)
    console.print(Text("        error:", style="bold"))
    _lines(dl.error or "(none)", style="red")
    if dl.metadata:
        console.print(Text("     metadata:", style="bold"))
        console.print(JSON(compact(dl.metadata)))
    if dl.kind == "invalid_payload":
        if dl.payload_text is not None:
            console.print(Text("payload (text):", style="bold"))
            _lines(dl.payload_text)
        else:
            console.print(Text("payload (base64, not UTF-8 text):", style="bold"))
            _lines(str(dl.raw.get("payload_b64", "")))
    elif dl.kind != "unreadable":
        console.print(Text("        input:", style="bold"))
        console.print(JSON(compact(dl.input)))
    else:
        console.print(Text("  record (raw):", style="bold"))
        _lines(str(dl.raw.get("data", "")))
    if dl.traceback:
        console.print(Text("    traceback:", style="bold"))
        _lines(dl.traceback)


@dead_group.command("replay")
@click.argument("ref", required=False)
@click.option("--type", "task_type", help="Replay the dead letters of this task type.")
@click.option("--all", "all_", is_flag=True, help="With --type: replay every one of them.")
@click.option("--dry-run", is_flag=True, help="Say what would be re-submitted; submit nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_conn
def dead_replay(
    conn: ConnOptions,
    ref: str | None,
    task_type: str | None,
    all_: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-submit dead tasks: REF (a sequence or run id), or --type T (with --all
    when it has more than one dead letter).

    Each task goes back on its original subject (type, group, run, step, input)
    with attempt 1, a fresh retry budget, and metadata replayed_from naming the
    dead letter. Replaying one dead letter twice (within the 10 min duplicate
    window of TASK_QUEUES) submits it once. Exits 1 when no worker is listening
    for a replayed task (it was still queued and runs when one starts).

    \b
    Examples:
      jsworker dead replay 42
      jsworker dead replay run-6f1c2a9e0b7d4c3e8a21
      jsworker dead replay --type send-email --all --dry-run
    """
    if (ref is None) == (task_type is None):
        raise CLIError("give either a dead letter (SEQ or RUN_ID) or --type TYPE, not both")
    if all_ and task_type is None:
        raise CLIError("--all goes with --type TYPE")
    with library_errors():
        if task_type is not None:
            n.validate_task_type(task_type)

    async def go(nc: NATS) -> list[ReplayResult]:
        if ref is not None:
            targets = [await get_dead(nc, ref)]
        else:
            assert task_type is not None
            targets = [d for d in await list_dead(nc, task_type=task_type) if d.replayable]
            if not targets:
                raise CLIError(f"no replayable dead letter of type {task_type}")
            if len(targets) > 1 and not all_:
                raise CLIError(
                    f"{len(targets)} dead letters of type {task_type}: pass --all to replay "
                    "every one, or give one SEQ (`jsworker dead list --type` shows them)"
                )
        return [await replay_dead(nc, d, dry_run=dry_run) for d in targets]

    results = run(with_nc(conn, go))
    if as_json:
        print_json(
            [
                {
                    "seq": r.dl.seq,
                    "task_type": r.dl.task_type,
                    "run_id": r.run_id,
                    "subject": r.subject,
                    "duplicate": r.duplicate,
                    "listening": r.listening,
                    "dry_run": r.dry_run,
                }
                for r in results
            ]
        )
    else:
        for r in results:
            line = Text("would replay " if r.dry_run else "replayed ")
            line.append(f"dead letter {r.dl.seq}", style="bold")
            line.append(safe(f" ({r.dl.task_type}, run "))
            line.append(safe(r.run_id), style="cyan")
            line.append(safe(f") on {r.subject}"))
            if r.duplicate:
                line.append("  duplicate: already replayed, not submitted again", style="yellow")
            console.print(line, soft_wrap=True)
            if not r.dry_run and not r.duplicate:
                # the run's history still starts with the original failure: follow the
                # events (the replay's are recorded after it), not `task watch`
                console.print(
                    Text("  follow it: ", style="dim").append(
                        safe(f"jsworker task events {r.run_id} --follow"), style=""
                    ),
                    soft_wrap=True,
                )
        submitted = sorted({r.dl.task_type for r in results if not r.dry_run and not r.duplicate})
        for t in submitted:
            console.print(
                Text("  if it fails again, its new dead letter is listed by: ", style="dim").append(
                    safe(f"jsworker dead list --type {t}"), style=""
                ),
                soft_wrap=True,
            )
    deaf = sorted({r.subject.rsplit(".", 1)[0] for r in results if not r.listening})
    if deaf:
        verb = "would wait" if dry_run else "waits"
        raise CLIError(
            f"no worker is listening for {', '.join(deaf)}: the task {verb} in TASK_QUEUES "
            "until one starts"
        )


@dead_group.command("purge")
@click.option("--type", "task_type", help="Task type whose dead letters are deleted (required).")
@click.option(
    "--older-than",
    type=DURATION,
    help="Delete those stored more than DURATION ago (7d, 12h; 0 = all of them). Required.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@pass_conn
def dead_purge(
    conn: ConnOptions,
    task_type: str | None,
    older_than: float | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete the dead letters of one task type older than a given age. Asks for
    confirmation unless --yes. A purge without --type and --older-than is refused.

    \b
    Examples:
      jsworker dead purge --type send-email --older-than 7d
      jsworker dead purge --type send-email --older-than 0 --yes
    """
    if task_type is None or older_than is None:
        raise CLIError(
            "refusing to purge without a filter: give --type TYPE and --older-than DURATION "
            "(e.g. --older-than 7d; 0 for all of that type)"
        )
    with library_errors():
        n.validate_task_type(task_type)
    age = older_than

    async def count(nc: NATS) -> int:
        total = len(await list_dead(nc, task_type=task_type))
        young = len(await list_dead(nc, task_type=task_type, since=age)) if age else 0
        return total - young

    if not yes:
        found = run(with_nc(conn, count))
        if found == 0:
            _purged(task_type, 0, as_json)
            return
        click.confirm(
            f"Delete {found} dead letter(s) of {task_type} older than {_age(age)}?",
            abort=True,
            err=True,
        )
    purged = run(with_nc(conn, lambda nc: purge_dead(nc, task_type=task_type, older_than=age)))
    _purged(task_type, purged, as_json)


def _age(s: float) -> str:
    return "0s (all of them)" if not s else _ago(s).removesuffix(" ago")


def _purged(task_type: str, purged: int, as_json: bool) -> None:
    if as_json:
        print_json({"task_type": task_type, "purged": purged})
    else:
        console.print(safe_text(f"purged {purged} dead letter(s) of {task_type}"))


__all__ = ["DURATION", "dead_group", "parse_duration"]
