"""Output helpers: the rich consoles, one-line errors, JSON, and event lines.

Anything that comes from the server or the user (task output, error texts, names) is
printed as :class:`rich.text.Text`, never as console markup, so a payload containing
``[bold]`` or ``[/]`` is shown as-is instead of breaking the output.
"""

from __future__ import annotations

import json
from typing import IO, Any

import click
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

# colour per ProvisionResult.status (``jsworker kv setup``)
STATUS_STYLE = {
    "created": "green",
    "exists": "dim",
    "updated": "yellow",
    "drifted": "bold red",
    "missing": "bold red",
    "would-create": "cyan",
    "would-update": "cyan",
}

EVENT_STYLE = {
    "step.started": "blue",
    "step.completed": "green",
    "step.failed": "red",
    "step.continue": "cyan",
    "step.cancelled": "yellow",
}


class CLIError(click.ClickException):
    """A failure the user can act on: printed as one red line on stderr, exit code 1.

    (Usage errors stay :class:`click.UsageError`: click's message and exit code 2.)"""

    def show(self, file: IO[Any] | None = None) -> None:
        err(f"Error: {self.format_message()}")


def err(message: str, style: str = "red") -> None:
    """One line on stderr; ``soft_wrap`` keeps a long message on one line."""
    err_console.print(Text(message, style=style), soft_wrap=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def event_text(ev: dict[str, Any]) -> Text:
    """One lifecycle event as a line: time, type, step, attempt, details."""
    p = ev.get("payload") or {}
    et = str(ev.get("type", "?"))
    detail = ""
    if "output" in p:
        detail = compact(p["output"])
    if p.get("error"):
        detail = f"{p.get('kind', '')}: {p['error']}"
    if p.get("reason"):
        detail = str(p["reason"])
    t = Text()
    t.append(f"{ev.get('timestamp', '')}  ", style="dim")
    t.append(f"{et:15}", style=EVENT_STYLE.get(et, ""))
    t.append(f" {ev.get('step_id', '')}  attempt {ev.get('attempt_number', '')}  ")
    if ev.get("worker_id"):
        t.append(f"on {ev['worker_id']}  ", style="dim")
    t.append(detail)
    return t
