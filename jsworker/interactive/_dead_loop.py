"""Fix dead letters from the notebook: run a function on the inputs of the last dead
letters of a type, *locally* (no events, no acks, no checkpoints: nothing is written to
the wire; the only I/O is reading the dead letters), show input / recorded error / new
result side by side, then replay the ones that now pass.

The loop: see the failure, fix the handler in a cell, prove the fix on the real inputs
(:func:`try_dead`), replay them for real (:meth:`Trial.replay`: re-submitted with a
link to the dead letter and deduplicated, see ``jsworker._dead.replay_dead``).
"""

from __future__ import annotations

import asyncio
import html
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .. import _names as n
from .. import _wire as w
from .._context import TaskContext, TaskInfo
from .._dead import DeadLetter, ReplayResult, list_dead, replay_dead
from .._errors import ConfigError, JSWorkerError

if TYPE_CHECKING:
    from ._session import Session


class LocalRunError(JSWorkerError):
    """A handler tried local trial I/O that would write to the wire."""


class _NoWire:
    """Stands in for the message and the services in a local trial: reads that have a
    neutral answer get it, everything that would write raises :class:`LocalRunError`."""

    async def in_progress(self) -> None:  # ctx.heartbeat(): nothing to extend
        return None

    async def load_checkpoint(self, info: TaskInfo) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        async def refused(*a: Any, **k: Any) -> None:
            raise LocalRunError(
                f"{name} is not available in a local trial of a dead letter (nothing is "
                "written to the wire): guard it, or test that path on a real task"
            )

        return refused


@dataclass(frozen=True)
class TrialRow:
    dead: DeadLetter
    passed: bool
    result: Any  # the output when passed
    error: str | None  # the new error otherwise
    seconds: float


@dataclass
class Trial:
    """The result of :func:`try_dead`: one row per dead letter, oldest first."""

    session: Session
    task_type: str
    function: str
    rows: list[TrialRow]
    replayed: list[ReplayResult] = field(default_factory=list)

    @property
    def passing(self) -> list[TrialRow]:
        """Rows the function now handles and that hold a task to re-submit."""
        return [r for r in self.rows if r.passed and r.dead.replayable]

    async def replay(self, *, dry_run: bool = False) -> Replayed:
        """Re-submit, for real, every dead letter the function now handles (the
        others are left alone). Each carries ``metadata["replayed_from"]`` and the
        message id ``replay.{seq}``, so replaying twice submits once (``duplicate``).
        Returns a :class:`Replayed` (a list of ``ReplayResult`` with a summary)."""
        out = [await replay_dead(self.session.nc, r.dead, dry_run=dry_run) for r in self.passing]
        if not dry_run:
            self.replayed = out
        return Replayed(out, trial=self, dry_run=dry_run)

    def _what(self) -> str:
        n = len(self.rows)
        return "the last dead letter" if n == 1 else f"the last {n} dead letters"

    def _summary(self) -> str:
        """The sentence above the table, as text (the REPL: no magics there)."""
        if not self.rows:
            return f"No dead letters of {self.task_type}: nothing to try {self.function} on."
        ok, bad = len(self.passing), len(self.rows) - len(self.passing)
        what = self._what()
        head = f"{self.function} on {what} of {self.task_type}: {ok} pass, {bad} fail."
        if not ok:
            return head + " Nothing to replay yet."
        return head + f" Replay the {ok} passing with `await` this result's `.replay()`."

    def _repr_html_(self) -> str:
        e = html.escape
        if not self.rows:
            return (
                f"<p>No dead letters of <code>{e(self.task_type)}</code>: nothing to try "
                f"<b>{e(self.function)}</b> on.</p>"
            )
        ok = len(self.passing)
        what = self._what()
        head = (
            f"<p><b>{e(self.function)}</b> on {what} of "
            f"<code>{e(self.task_type)}</code>: {ok} pass, "
            f"{len(self.rows) - ok} fail. "
            + (
                f"Replay the {ok} passing with <code>%jsworker replay</code> "
                "(in Python: <code>await</code> this result's <code>.replay()</code>).</p>"
                if ok
                else "Nothing to replay yet.</p>"
            )
        )
        rows = "".join(
            "<tr>"
            + f"<td>{r.dead.seq}</td><td><code>{e(_short(_input(r.dead)))}</code></td>"
            + f"<td style='color:#a00'>{e(_short(r.dead.error))}</td>"
            + (
                f"<td style='color:#070'>&#10003; {e(_short(r.result))}</td>"
                if r.passed
                else f"<td style='color:#a00'>&#10007; {e(_short(r.error))}</td>"
            )
            + "</tr>"
            for r in self.rows
        )
        return (
            head
            + "<table><tr><th>seq</th><th>input</th><th>recorded error</th>"
            + f"<th>now</th></tr>{rows}</table>"
        )

    def __rich__(self) -> RenderableType:
        if not self.rows:
            return Text(self._summary())
        t = Table(title=self._summary(), title_justify="left")
        for col in ("seq", "input", "recorded error", "now"):
            t.add_column(col)
        for r in self.rows:
            t.add_row(
                str(r.dead.seq),
                Text(_short(_input(r.dead))),
                Text(_short(r.dead.error), style="red"),
                Text("ok " + _short(r.result), style="green")
                if r.passed
                else Text("fails " + _short(r.error), style="red"),
            )
        return t

    def __repr__(self) -> str:
        if not self.rows:
            return f"<Trial {self.function}: no dead letters of {self.task_type}>"
        return (
            f"<Trial {self.function} on {len(self.rows)} dead letters of {self.task_type}: "
            f"{len(self.passing)} pass>"
        )


class Replayed(list[ReplayResult]):
    """What :meth:`Trial.replay` did: the ``ReplayResult`` of each re-submitted dead
    letter (a list), shown as a sentence rather than a list of reprs."""

    def __init__(self, results: list[ReplayResult], *, trial: Trial, dry_run: bool) -> None:
        super().__init__(results)
        self.trial = trial
        self.dry_run = dry_run

    def summary(self) -> str:
        t = self.trial
        left = len(t.rows) - len(self)
        rest = f"; {left} still failing left alone" if left else ""
        if not self:
            why = (
                f"no dead letters of {t.task_type}"
                if not t.rows
                else f"{t.function} passes none of {t._what()}"
            )
            return f"Nothing replayed: {why}."
        runs = ", ".join(r.run_id for r in self)
        if self.dry_run:
            return (
                f"Dry run: {_dead_letters(len(self))} of {t.task_type} would be re-submitted "
                f"(runs {runs}){rest}."
            )
        new = [r for r in self if not r.duplicate]
        dup = len(self) - len(new)
        parts = [f"Replayed {_dead_letters(len(new))} of {t.task_type}"]
        if new:
            parts[0] += f" (runs {', '.join(r.run_id for r in new)})"
        if dup:
            parts.append(f"{dup} already replayed before (not submitted again)")
        waiting = [r for r in new if not r.listening]
        if waiting:
            parts.append(
                f"{len(waiting)} wait in the queue: no worker serves "
                f"{', '.join(sorted({r.subject for r in waiting}))} yet"
            )
        return "; ".join(parts) + rest + "."

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.summary())}</p>"

    def __rich__(self) -> RenderableType:
        return Text(self.summary())


def _dead_letters(n: int) -> str:
    return f"{n} dead letter" + ("" if n == 1 else "s")


async def try_dead(
    session: Session, task_type: str, fn: Callable[..., Any], *, last: int = 10
) -> Trial:
    """Run ``fn`` (a handler: ``fn(ctx)``, sync or async) on the inputs of the last
    ``last`` dead letters of ``task_type``, locally, one after the other."""
    n.validate_task_type(task_type)
    if not isinstance(last, int) or last < 1:
        raise ConfigError(f"last must be an int >= 1, got {last!r}")
    dead = await list_dead(session.nc, task_type=task_type, limit=last)
    rows = [await _run_one(fn, dl) for dl in dead]
    name = getattr(fn, "__qualname__", repr(fn))
    trial = Trial(session, task_type, name, rows)
    from ._magics import state  # `%jsworker replay` replays the latest trial

    state.last_trial = trial
    return trial


def _input(dl: DeadLetter) -> Any:
    return dl.payload_text if dl.payload_text is not None else dl.input


async def _run_one(fn: Callable[..., Any], dl: DeadLetter) -> TrialRow:
    meta = {str(k): str(v) for k, v in (dl.metadata or {}).items()}
    run_id = dl.run_id or f"dead-{dl.seq}"
    step_id = dl.step_id or "0"
    info = TaskInfo(
        task_type=dl.task_type,
        task_id=str(dl.raw.get("task_id") or f"dead-{dl.seq}"),
        run_id=run_id,
        step_id=step_id,
        attempt=1,
        iteration=dl.iteration,
        metadata=meta,
        group=dl.group,
        subject=dl.task_subject or dl.subject,
        stream_sequence=dl.seq,
    )
    payload = w.TaskPayload(
        info.task_id, run_id, step_id, iteration=dl.iteration, input=_input(dl), metadata=meta
    )
    stub = _NoWire()
    ctx = TaskContext(info, payload, cast(Any, stub), cast(Any, stub), asyncio.get_running_loop())
    t0 = time.monotonic()
    try:
        if inspect.iscoroutinefunction(fn):
            result = await fn(ctx)
        else:
            result = await asyncio.to_thread(fn, ctx)
    except Exception as e:
        return TrialRow(dl, False, None, f"{type(e).__name__}: {e}", time.monotonic() - t0)
    took = time.monotonic() - t0
    o = ctx.outcome
    if o is not None:
        if o.kind == "complete":
            return TrialRow(dl, True, o.output, None, took)
        return TrialRow(dl, False, None, f"{o.kind}: {o.error}", took)
    try:
        return TrialRow(dl, True, w.to_json_value(result, "handler return value"), None, took)
    except JSWorkerError as e:
        return TrialRow(dl, False, None, str(e), took)


def _short(v: Any, width: int = 60) -> str:
    s = v if isinstance(v, str) else w.dumps(v).decode() if _jsonable(v) else repr(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def _jsonable(v: Any) -> bool:
    try:
        w.dumps(v)
    except (TypeError, ValueError):
        return False
    return True
