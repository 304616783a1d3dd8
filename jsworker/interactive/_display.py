"""What a person looks at: the worker, its handlers, each partitioned type's map
(members -> partitions, from KV ``elastic-consumer-groups``, so every member of the
cluster shows, not only this one) and the session's recent outcomes.

A :class:`Snapshot` is read once (``await session.status()``) and renders as HTML in a
notebook (``_repr_html_``) and as rich tables in the REPL (``__rich__``).
:func:`live` keeps one notebook display updated in place while members join and leave.
IPython is imported only inside :func:`live`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .._errors import JSWorkerError, LifecycleError

if TYPE_CHECKING:
    from ._session import RecentOutcome, Session


@dataclass(frozen=True)
class GroupMap:
    """One elastic group as all its members see it."""

    task_type: str
    group: str | None
    max_partitions: int
    members: dict[str, list[int]]  # member -> partitions it owns
    unassigned: list[int]
    not_consumed: list[int]
    revision: int
    me: str
    error: str | None = None

    def __repr__(self) -> str:
        if self.error:
            return f"map {self.task_type}: {self.error}"
        return f"map {self.task_type}: {len(self.members)} members " + ", ".join(
            f"{k}={_ranges(v)}" for k, v in sorted(self.members.items())
        )

    def _repr_html_(self) -> str:
        e = html.escape
        m = self
        title = f"partition map {m.task_type}" + (f" group {m.group}" if m.group else "")
        if m.error:
            return f"<p><b>{e(title)}</b>: {e(m.error)}</p>"
        rows: list[list[Any]] = [
            [
                (member + "  (this session)") if member == m.me else member,
                len(parts),
                _ranges(parts),
            ]
            for member, parts in sorted(m.members.items())
        ]
        if m.unassigned:
            rows.append(["(unassigned)", len(m.unassigned), _ranges(m.unassigned)])
        return _html_table(
            f"{title}: {len(m.members)} members, {m.max_partitions} partitions, "
            f"revision {m.revision}",
            ["member", "count", "partitions"],
            rows,
            bar=[(member, len(parts)) for member, parts in sorted(m.members.items())],
            total=m.max_partitions,
            me=m.me,
        ) + (
            f"<p style='margin:2px 0'><i>{e(m.not_consumed_note())}</i></p>"
            if m.not_consumed
            else ""
        )

    def not_consumed_note(self) -> str:
        """Partitions counted in their member's row whose consumer is not there (yet):
        a state of those partitions, not one more member."""
        n = len(self.not_consumed)
        return (
            f"note: {n} of the partitions above ({_ranges(self.not_consumed)}) "
            f"{'is' if n == 1 else 'are'} assigned but not consumed yet "
            "(the member's consumer is starting, or its member is gone)"
        )


@dataclass(frozen=True)
class Snapshot:
    worker_id: str
    url: str
    group: str | None
    state: str
    in_flight: int
    stats: dict[str, int]
    handlers: list[dict[str, Any]]
    maps: list[GroupMap]
    recent: list[RecentOutcome]
    taken_at: float = field(default_factory=time.time)

    def members(self, task_type: str) -> list[str]:
        """The members this snapshot shows in ``task_type``'s map (sorted; empty when
        the map is not shown or could not be read)."""
        return sorted(m for g in self.maps if g.task_type == task_type for m in g.members)

    def __repr__(self) -> str:
        lines = [
            f"worker {self.worker_id} {self.state} on {self.url}"
            + (f" group {self.group}" if self.group else "")
            + f", in flight {self.in_flight}"
        ]
        for h in self.handlers:
            lines.append(
                f"  handler {h.get('task_type')} v{h.get('version')} ({_mode(h)}) held {_held(h)}"
            )
        lines.extend(f"  {m!r}" for m in self.maps)
        return "\n".join(lines)

    # ------------------------------------------------------------- notebook
    def _repr_html_(self) -> str:
        e = html.escape
        head = [
            f"<b>jsworker</b> worker <code>{e(self.worker_id)}</code> "
            f"<span style='color:{'green' if self.state == 'running' else 'gray'}'>"
            f"{e(self.state)}</span> on <code>{e(self.url)}</code>"
            + (f" group <code>{e(self.group)}</code>" if self.group else ""),
            f"in flight {self.in_flight}",
        ]
        stats = ", ".join(f"{e(k)} {v}" for k, v in self.stats.items() if v)
        if stats:
            head.append(stats)
        out = [
            '<div class="jsworker-snapshot" style="font-family: sans-serif">',
            " &middot; ".join(head),
            _html_table(
                "handlers",
                ["type", "function", "version", "partitions", "held", "in flight"],
                [
                    [
                        h.get("task_type"),
                        h.get("function"),
                        h.get("version"),
                        _mode(h),
                        _held(h),
                        h.get("in_flight"),
                    ]
                    for h in self.handlers
                ],
                empty="(none yet: define one with @session.handle)",
            ),
        ]
        for m in self.maps:
            out.append(m._repr_html_())
        if self.recent:
            out.append(
                _html_table(
                    f"recent outcomes (last {len(self.recent)})",
                    ["type", "v", "key", "outcome", "detail", "ms"],
                    [
                        [
                            r.task_type,
                            r.version,
                            r.key or "",
                            r.kind,
                            r.detail,
                            f"{r.seconds * 1000:.1f}",
                        ]
                        for r in reversed(self.recent[-10:])
                    ],
                )
            )
        out.append("</div>")
        return "\n".join(out)

    # ------------------------------------------------------------------ REPL
    def __rich__(self) -> RenderableType:
        head = Text.assemble(
            ("worker ", "bold"),
            (self.worker_id, "cyan"),
            f" {self.state} on {self.url}",
            f" group {self.group}" if self.group else "",
            f"  in flight {self.in_flight}  ",
            ", ".join(f"{k} {v}" for k, v in self.stats.items() if v),
        )
        t = Table(title="handlers", title_justify="left")
        for col in ("type", "function", "version", "partitions", "held", "in flight"):
            t.add_column(col)
        for h in self.handlers:
            t.add_row(
                Text(str(h.get("task_type"))),
                Text(str(h.get("function"))),
                str(h.get("version")),
                _mode(h),
                _held(h),
                str(h.get("in_flight")),
            )
        parts: list[RenderableType] = [head, t]
        for m in self.maps:
            title = f"{m.task_type}" + (f" group {m.group}" if m.group else "")
            if m.error:
                parts.append(Text(f"{title}: {m.error}", style="yellow"))
                continue
            mt = Table(
                title=f"partition map {title}: {len(m.members)} members, "
                f"{m.max_partitions} partitions",
                title_justify="left",
            )
            mt.add_column("member")
            mt.add_column("count", justify="right")
            mt.add_column("partitions")
            for member, ps in sorted(m.members.items()):
                mt.add_row(
                    Text(member, style="bold green" if member == m.me else ""),
                    str(len(ps)),
                    _ranges(ps),
                )
            if m.unassigned:
                mt.add_row(
                    Text("(unassigned)", style="red"),
                    str(len(m.unassigned)),
                    _ranges(m.unassigned),
                )
            parts.append(mt)
            if m.not_consumed:
                parts.append(Text(m.not_consumed_note(), style="yellow"))
        if self.recent:
            rt = Table(title="recent outcomes", title_justify="left")
            for col in ("type", "v", "key", "outcome", "detail"):
                rt.add_column(col)
            for r in list(self.recent)[-5:]:
                rt.add_row(
                    Text(r.task_type),
                    str(r.version),
                    Text(r.key or ""),
                    Text(r.kind, style="green" if r.kind == "complete" else "red"),
                    Text(r.detail),
                )
            parts.append(rt)
        return Group(*parts)


async def take_snapshot(session: Session, types: Sequence[str] = ()) -> Snapshot:
    """Read the worker (no I/O) and the group map (KV reads) of every partitioned
    handler, and of ``types`` (partitioned types served by others) too."""
    w = session.worker
    handlers = w.handler_info() if not session.closed else []
    wanted: list[tuple[str, str | None]] = []
    for h in handlers:
        if h.get("partitions") or h.get("singleton"):
            wanted.extend((str(h["task_type"]), g) for g in h.get("groups") or [None])
    for t in types:
        for g in [session.group] if session.group else [None]:
            if (t, g) not in wanted:
                wanted.append((t, g))
    maps = [await group_map(session, t, g) for t, g in wanted] if not session.closed else []
    state = "closed" if session.closed else ("running" if w.running else "stopped")
    return Snapshot(
        worker_id=w.worker_id,
        url=session.url,
        group=session.group,
        state=state,
        in_flight=w.in_flight,
        stats=w.stats.as_dict(),
        handlers=handlers,
        maps=maps,
        recent=list(session.recent),
    )


async def group_map(session: Session, task_type: str, group: str | None) -> GroupMap:
    me = session.worker.worker_id
    try:
        view = await session.partitions(task_type, group)
    except JSWorkerError as e:
        return GroupMap(task_type, group, 0, {}, [], [], 0, me, error=str(e))
    members: dict[str, list[int]] = {m: [] for m in view["members"]}
    for mm in view["member_mappings"]:
        members.setdefault(mm["member"], [])
    unassigned: list[int] = []
    not_consumed: list[int] = []
    for p in view["partitions"]:
        if p["member"]:
            members.setdefault(p["member"], []).append(p["partition"])
            if not p["consuming"]:
                not_consumed.append(p["partition"])
        else:
            unassigned.append(p["partition"])
    return GroupMap(
        task_type,
        group,
        int(view["max_members"]),
        members,
        unassigned,
        not_consumed,
        int(view["revision"] or 0),
        me,
    )


def session_html(session: Session) -> str:
    """What a bare ``session`` shows in a notebook: no I/O (``_repr_html_`` is
    synchronous), so no partition maps; ``await session.status()`` has them."""
    w = session.worker
    snap = Snapshot(
        worker_id=w.worker_id,
        url=session.url,
        group=session.group,
        state="closed" if session.closed else ("running" if w.running else "stopped"),
        in_flight=w.in_flight if not session.closed else 0,
        stats=w.stats.as_dict(),
        handlers=w.handler_info() if not session.closed else [],
        maps=[],
        recent=list(session.recent),
    )
    return snap._repr_html_()


class LiveView:
    """A notebook display kept current by a task on the kernel's loop (see :func:`live`).

    The view samples: it re-reads the snapshot every ``every`` seconds and sends it only
    when it changed, so a member that joins and leaves between two reads never shows.
    Code that depends on what the display shows waits on it with :meth:`wait_until`
    (``shown`` is the snapshot on display now), not on ``updates`` or a sleep."""

    def __init__(self, session: Session, every: float, types: Sequence[str] = ()) -> None:
        self.session = session
        self.every = every
        self.types = tuple(types)
        self.task: asyncio.Task[None] | None = None
        self.updates = 0
        self.error: str | None = None
        self.shown: Snapshot | None = None
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()

    async def _loop(self, handle: Any, last: str) -> None:
        try:
            while not self.session.closed:
                self._wake.clear()  # a wait_until() during the read below reads again at once
                try:
                    snap = await take_snapshot(self.session, self.types)
                    page = snap._repr_html_()
                    # timestamps aside, only a changed view is sent (keeps the notebook light)
                    if page != last:
                        handle.update(snap)
                        last = page
                        self.updates += 1
                        async with self._changed:
                            self.shown = snap
                            self._changed.notify_all()
                    self.error = None
                except Exception as e:  # kept in the view's repr, never lost in a log
                    self.error = f"{type(e).__name__}: {e}"
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.every)
        finally:
            async with self._changed:  # waiters learn the view has ended
                self._changed.notify_all()

    def start(self, handle: Any, first: Snapshot) -> None:
        """Keep ``handle`` (an IPython ``DisplayHandle`` showing ``first``) updated."""
        self.shown = first
        self.task = asyncio.get_running_loop().create_task(
            self._loop(handle, first._repr_html_()), name="jsworker-live"
        )

    def _running(self) -> bool:
        return self.task is not None and not self.task.done() and not self.task.cancelling()

    async def wait_until(
        self, predicate: Callable[[Snapshot], bool], timeout: float = 30.0
    ) -> Snapshot:
        """Wait until the display shows a snapshot for which ``predicate`` holds (read
        again at once, then every time it changes); returns that snapshot. Raises
        :class:`TimeoutError` after ``timeout`` seconds and :class:`LifecycleError`
        when the view has stopped, both naming what it shows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while self.shown is None or not predicate(self.shown):
                if not self._running():
                    raise LifecycleError(f"{self!r} stopped before showing what was awaited")
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(
                        f"{self!r} did not show what was awaited within {timeout:g} s; "
                        f"it shows: {self.shown!r}"
                    )
                self._wake.set()  # read now rather than at the next tick
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            return self.shown

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def __repr__(self) -> str:
        state = "running" if self._running() else "stopped"
        error = f", last read failed: {self.error}" if self.error else ""
        return f"<jsworker live view, {state}, {self.updates} updates{error}>"


async def live(session: Session, every: float = 1.0, types: Sequence[str] = ()) -> LiveView:
    """Show the session's snapshot in this cell and keep it updated (every ``every``
    seconds, only when it changed) while the kernel is idle or runs other cells.
    ``types``: partitioned types to show the map of even when this session does not
    handle them (yet). ``.stop()`` ends the updates; closing the session ends them.
    ``await view.wait_until(predicate)`` waits until the display shows a given state."""
    from IPython.display import display

    view = LiveView(session, every, types)
    first = await take_snapshot(session, view.types)
    handle = display(first, display_id=True)  # type: ignore[no-untyped-call]
    if handle is None:  # no IPython shell: nothing to update in place
        raise LifecycleError(
            "live needs a notebook kernel (IPython): elsewhere use `await session.status()` "
            "or `jsworker repl`"
        )
    view.start(handle, first)
    return view


def _mode(h: dict[str, Any]) -> str:
    if h.get("singleton"):
        return "singleton"
    p = h.get("partitions") or 0
    return str(p) if p else "shared"


def _held(h: dict[str, Any]) -> str:
    held = h.get("held") or {}
    return "; ".join(f"{_ranges(list(v))}" for v in held.values() if v) or "-"


def _ranges(ps: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    ps = sorted(ps)
    out: list[str] = []
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ", ".join(out)


_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6"]


def _html_table(
    title: str,
    cols: list[str],
    rows: list[list[Any]],
    *,
    empty: str | None = None,
    bar: list[tuple[str, int]] | None = None,
    total: int = 0,
    me: str | None = None,
) -> str:
    """A titled table; ``empty``: one row across every column when there are no rows.
    ``bar``: (member, count) segments of ``total`` above it, with a legend."""
    e = html.escape
    parts = [f"<p style='margin:6px 0 2px 0'><b>{e(title)}</b></p>"]
    if bar and total:
        parts.append(_bar(bar, total, me))
    parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>")
    if not rows and empty is not None:
        parts.append(f"<tr><td colspan='{len(cols)}'><i>{e(empty)}</i></td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _bar(bar: list[tuple[str, int]], total: int, me: str | None) -> str:
    """The share of each member as a bar of coloured segments, and the legend naming
    each colour (the part left white is unassigned)."""
    e = html.escape
    segs: list[str] = []
    legend: list[str] = []
    for i, (m, c) in enumerate(bar):
        colour = _COLOURS[i % len(_COLOURS)]
        segs.append(
            f"<div title='{e(m)}: {c}' style='width:{100 * c / total:.2f}%;"
            f"background:{colour};height:10px'></div>"
        )
        name = e(m) + (" (this session)" if m == me else "")
        legend.append(
            "<span style='margin-right:10px;white-space:nowrap'>"
            f"<span style='display:inline-block;width:10px;height:10px;background:{colour};"
            f"margin-right:3px'></span>{name}: {c}</span>"
        )
    left = total - sum(c for _, c in bar)
    if left > 0:
        legend.append(
            "<span style='margin-right:10px;white-space:nowrap'>"
            "<span style='display:inline-block;width:10px;height:10px;background:#fff;"
            f"border:1px solid #ccc;margin-right:3px'></span>unassigned: {left}</span>"
        )
    return (
        f"<div style='display:flex;width:320px;border:1px solid #ccc'>{''.join(segs)}</div>"
        f"<div class='jsworker-legend' style='font-size:85%;margin:2px 0'>{''.join(legend)}</div>"
    )
