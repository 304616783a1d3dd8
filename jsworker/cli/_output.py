"""Output helpers: the rich consoles, one-line errors, JSON, event lines, and the two
rules every printed string follows.

* **Terminal-safe.** Anything that comes from the server or another process (task
  output, error texts, directory entries, names, subjects) is printed through
  :func:`safe_text`: as :class:`rich.text.Text`, never as console markup (a ``[/]`` in a
  worker id cannot break the table), with control characters escaped (``\\x1b[31m`` is
  shown as the six characters ``\\x1b[31m``, never sent to the terminal as an escape
  sequence; the same for ``\\r``, NUL, DEL, C1 controls and the bidi overrides that can
  make text read differently from what it is). JSON output is safe as it is:
  ``json.dumps`` escapes control characters.
* **No secrets.** Passwords and tokens the command was given (the URL's
  ``user:password@``, ``--password``, ``--token``) are registered with
  :func:`add_secret` when the connection options are built, and replaced by ``***`` in
  every error line (:func:`err`, :class:`CLIError`) and every ``--json`` string
  (:func:`print_json`). Banners and table titles print :attr:`ConnOptions.display_url`,
  which has no password to begin with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import IO, Any

import click
from rich import box
from rich.console import Console
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from .._redact import REDACTED


class _TerminalSafeConsole(Console):
    """A rich console that never writes a control character it did not make itself.

    The safety net under :func:`safe_text`: every command prints wire strings through
    ``safe_text``, and should one be missed (a new command, a new field), its text
    segments are still escaped here before rich adds its own styling. Segments rich marks
    as control (cursor moves of ``Live``) and the line breaks of its layout pass."""

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            seg if seg.control or not _UNSAFE_IN_LAYOUT.search(seg.text)
            else Segment(_UNSAFE_IN_LAYOUT.sub(_escape, seg.text), seg.style, seg.control)
            for seg in buffer
        )  # fmt: skip


console: Console = _TerminalSafeConsole()
err_console: Console = _TerminalSafeConsole(stderr=True)


# colour per ProvisionResult.status (``jsworker kv setup``)
STATUS_STYLE = {
    "created": "green",
    "exists": "dim",
    "compatible": "dim green",
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

# C0 controls, DEL, C1 controls, and the Unicode bidi embeddings/overrides/isolates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# what may not reach the terminal even inside rich's own layout (where "\n" ends lines)
_UNSAFE_IN_LAYOUT = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

_secrets: set[str] = set()


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object) -> str:
    """``value`` as one printable line: control characters escaped as ``\\x1b``,
    ``\\r``, ``\\n``, ``\\x00``...; everything else (including ``[`` and ``]``) as is."""
    return _UNSAFE.sub(_escape, value if isinstance(value, str) else str(value))


def safe_text(value: object, style: str = "") -> Text:
    """A wire string as rich text: never parsed as markup, control characters escaped."""
    return Text(safe(value), style=style)


def add_secret(value: str | None) -> None:
    """Never print ``value``: errors and JSON output show ``***`` instead."""
    if value:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (longest first, so a
    secret containing another is replaced whole)."""
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def _redact_json(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_json(v) for v in value]
    return value


class CLIError(click.ClickException):
    """A failure the user can act on: printed as one red line on stderr, exit code 1.

    (Usage errors stay :class:`click.UsageError`: click's message and exit code 2.)"""

    def show(self, file: IO[Any] | None = None) -> None:
        err(f"Error: {self.format_message()}")


def err(message: str, style: str = "red") -> None:
    """One line on stderr, secrets redacted and control characters escaped (error texts
    often quote the wire); ``soft_wrap`` keeps a long message on one line."""
    err_console.print(safe_text(redact(message), style=style), soft_wrap=True)


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as JSON with secrets redacted in its strings (``default=str`` for
    datetimes and the like). Control characters come out escaped (``\\u001b``)."""
    if indent is None:
        return json.dumps(_redact_json(value), separators=(",", ":"), default=str)
    return json.dumps(_redact_json(value), indent=indent, default=str)


def print_json(value: Any) -> None:
    click.echo(json_text(value))


def print_json_line(value: Any) -> None:
    """One compact JSON document per line (``--json`` of streaming commands)."""
    click.echo(json_text(value, indent=None))


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def event_text(ev: Any) -> Text:
    """One lifecycle event as a line: time, type, step, attempt, details. Every field
    comes from the wire, so every field goes through :func:`safe` (and an event that is
    not a JSON object is shown as its JSON)."""
    if not isinstance(ev, dict):
        return safe_text(compact(ev))
    p = ev.get("payload")
    if not isinstance(p, dict):
        p = {}
    et = safe(ev.get("type", "?"))
    detail = ""
    if "output" in p:
        detail = compact(p["output"])
    if p.get("error"):
        detail = f"{safe(p.get('kind', ''))}: {safe(p['error'])}"
    if p.get("reason"):
        detail = safe(p["reason"])
    t = Text()
    t.append(f"{safe(ev.get('timestamp', ''))}  ", style="dim")
    t.append(f"{et:15}", style=EVENT_STYLE.get(et, ""))
    t.append(f" {safe(ev.get('step_id', ''))}  attempt {safe(ev.get('attempt_number', ''))}  ")
    if ev.get("worker_id"):
        t.append(f"on {safe(ev['worker_id'])}  ", style="dim")
    t.append(safe(detail))
    return t


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 member``, ``2 members``, ``0 members`` (``many``: an irregular plural)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def make_table(title: str | Text, **kw: Any) -> Table:
    """A table in the one style every command uses: a rule under the header, no box, the
    title on the left (wire strings in ``title`` go through :func:`safe_text` first)."""
    kw.setdefault("box", box.SIMPLE_HEAD)
    kw.setdefault("title_justify", "left")
    return Table(title=title, **kw)


def event_time(ev: dict[str, Any]) -> float | None:
    """An event's ``timestamp`` (RFC 3339) as epoch seconds; None when missing or not
    a time (from the wire: anything)."""
    from datetime import UTC, datetime

    stamp = ev.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        t = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()
