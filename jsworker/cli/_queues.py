"""``jsworker queues``: what waits, what runs and who consumes it, per task type.

Everything is read from the server (stream and consumer info, the elastic groups in KV),
never from worker self-reports, so tasks and consumers of workers in other languages are
counted the same way:

* ``TASK_QUEUES``' subjects (``task.{type}[.{group}].{run}``) give the tasks stored per
  type and group, including types nobody consumes yet;
* its consumers (one per type/group, named by :func:`jsworker._names.consumer_name`, or
  any name: the filter decides) give queued (``num_pending``), in flight
  (``num_ack_pending``), redelivered and waiting pulls;
* partitioned types' ``TASK_QUEUES-{cg}`` streams and their member consumers give the
  same for partitioned work, with the partition count and members from KV
  ``elastic-consumer-groups``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from rich.table import Table
from rich.text import Text

from .. import _names as n
from .._directory import is_live, list_workers, serves
from .._errors import NotProvisionedError
from .._pcg_config import ElasticConfig, PartitionConfigError, group_stream
from .._services import kv_snapshot
from ._connect import ConnOptions, pass_conn, run, with_nc
from ._output import console, make_table, plural, print_json, safe, safe_text

_GROUP_SEP = "__g_"
_API_TIMEOUT = 5.0


@dataclass
class QueueRow:
    """One task type (and group). Counts are tasks; ``oldest_age`` is seconds since the
    oldest task still in the queue (waiting, running or awaiting a retry) was stored."""

    task_type: str
    group: str | None = None
    stored: int = 0
    queued: int = 0
    in_flight: int = 0
    redelivered: int = 0
    oldest_age: float | None = None
    consumers: list[str] = field(default_factory=list)
    waiting_pulls: int = 0
    partitions: int | None = None
    members: list[str] = field(default_factory=list)
    filter: str = ""
    stream: str = n.TASK_STREAM
    #: ids of the live workers serving this type and group (:func:`attach_live`)
    live_workers: list[str] = field(default_factory=list)
    #: a live worker serves it, or some process has a pull request waiting on it
    live: bool = False

    @property
    def key(self) -> tuple[str, str | None]:
        return self.task_type, self.group

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.oldest_age is not None:
            d["oldest_age"] = round(self.oldest_age, 3)
        return d


def _split_cg(cg: str) -> tuple[str, str | None]:
    """Consumer name -> (type, group), the inverse of ``consumer_name``."""
    if _GROUP_SEP in cg:
        t, g = cg.split(_GROUP_SEP, 1)
        return t, g
    return cg, None


def _filter_key(filt: str) -> tuple[str, str | None] | None:
    """``task.T.>`` / ``task.T.*`` -> (T, None); ``task.T.G.>`` / ``task.T.G.*`` -> (T, G)."""
    toks = filt.split(".")
    if toks[0] != "task" or toks[-1] not in (">", "*") or "*" in toks[1:-1] or ">" in toks[:-1]:
        return None
    if len(toks) == 3:
        return toks[1], None
    if len(toks) == 4:
        return toks[1], toks[2]
    return None


async def _api(nc: NATS, subject: str, req: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = await nc.request(subject, json.dumps(req or {}).encode(), timeout=_API_TIMEOUT)
    out: dict[str, Any] = json.loads(resp.data)
    return out


async def subject_counts(nc: NATS, stream: str, filt: str) -> dict[str, int]:
    """Messages per subject of ``stream`` matching ``filt``, every page of the answer
    (the server sends at most 100,000 subjects per page)."""
    out: dict[str, int] = {}
    offset = 0
    while True:
        info = await _api(
            nc,
            f"$JS.API.STREAM.INFO.{stream}",
            {"subjects_filter": filt, "offset": offset},
        )
        if "error" in info:
            if info["error"].get("err_code") == 10059:
                raise NotProvisionedError(
                    f"stream {stream} does not exist: run `jsworker kv setup`"
                )
            raise nats.js.errors.APIError.from_error(info["error"])
        page = (info.get("state") or {}).get("subjects") or {}
        out.update({str(k): int(v) for k, v in page.items()})
        total, limit = int(info.get("total") or 0), int(info.get("limit") or 0)
        offset += len(page)
        if not page or not limit or offset >= total:
            return out


async def consumer_list(nc: NATS, stream: str) -> list[dict[str, Any]]:
    """Raw consumer infos of ``stream`` (every page); [] when the stream is gone."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = await _api(nc, f"$JS.API.CONSUMER.LIST.{stream}", {"offset": offset})
        if "error" in page:
            return out
        got = page.get("consumers") or []
        out.extend(c for c in got if isinstance(c, dict))
        offset += len(got)
        if not got or offset >= int(page.get("total") or 0):
            return out


async def _first_time(nc: NATS, stream: str, filt: str) -> datetime | None:
    """When the oldest message on ``filt`` still in ``stream`` was stored."""
    resp = await _api(nc, f"$JS.API.STREAM.MSG.GET.{stream}", {"seq": 1, "next_by_subj": filt})
    stamp = (resp.get("message") or {}).get("time")
    if not isinstance(stamp, str):
        return None
    return _parse_time(stamp)


def _parse_time(stamp: str) -> datetime | None:
    # the server writes nanoseconds; fromisoformat takes at most microseconds
    s = stamp.replace("Z", "+00:00")
    if "." in s:
        head, tail = s.split(".", 1)
        frac, tz = tail, ""
        for sign in ("+", "-"):
            if sign in tail:
                frac, tz = tail.split(sign, 1)
                tz = sign + tz
                break
        s = f"{head}.{frac[:6]}{tz}"
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        return None


def _consumer_counts(row: QueueRow, c: dict[str, Any]) -> None:
    row.consumers.append(str(c.get("name", "")))
    row.queued += int(c.get("num_pending") or 0)
    row.in_flight += int(c.get("num_ack_pending") or 0)
    row.redelivered += int(c.get("num_redelivered") or 0)
    row.waiting_pulls += int(c.get("num_waiting") or 0)


def attach_live(rows: list[QueueRow], workers: list[Any], now: float | None = None) -> None:
    """Fill ``live_workers`` and ``live`` of every row.

    A *live worker* of a type and group is an entry in the worker directory (KV
    ``workers``) that is fresh (:func:`jsworker._directory.is_live`) and whose handlers
    include the type on that group (:func:`jsworker._directory.serves`). A row is
    ``live`` when it has a live worker or a pull request waiting on its consumers (a
    process pulling that is not in the directory, e.g. another language's worker). A
    consumer alone proves nothing: durable consumers outlive the workers that made them."""
    entries = [e for e in workers if is_live(e, now)]
    for r in rows:
        r.live_workers = sorted(
            str(e.get("worker_id", "")) for e in entries if serves(e, r.task_type, r.group)
        )
        r.live = bool(r.live_workers) or r.waiting_pulls > 0


async def queue_report(
    nc: NATS, *, with_age: bool = True, workers: list[Any] | None = None
) -> list[QueueRow]:
    """One :class:`QueueRow` per task type (and group) that has stored tasks, a consumer
    on ``TASK_QUEUES`` or an elastic group; sorted by type and group. ``workers``: the
    directory entries (read from KV ``workers`` when not given) for :func:`attach_live`."""
    rows: dict[tuple[str, str | None], QueueRow] = {}

    def row(key: tuple[str, str | None]) -> QueueRow:
        if key not in rows:
            rows[key] = QueueRow(key[0], key[1])
        return rows[key]

    counts = await subject_counts(nc, n.TASK_STREAM, "task.>")
    stored: dict[tuple[str, str | None], int] = {}
    for subj, count in counts.items():
        toks = subj.split(".")
        key = (toks[1], toks[2] if len(toks) == 4 else None) if len(toks) in (3, 4) else None
        if key is None:
            key = (subj, None)  # not a jsworker subject: shown as it is
        stored[key] = stored.get(key, 0) + count

    consumers = await consumer_list(nc, n.TASK_STREAM)
    ungrouped: set[str] = set()  # types consumed by a worker without groups (task.T.>)
    for c in consumers:
        cfg = c.get("config") or {}
        filters = [cfg.get("filter_subject") or "", *(cfg.get("filter_subjects") or [])]
        keys = {k for f in filters if f and (k := _filter_key(f)) is not None}
        if not keys:
            key = (str(c.get("name", "")), None)  # consumes something else: show it by name
            keys = {key}
        for key in keys:
            r = row(key)
            r.filter = r.filter or next((f for f in filters if f), "")
            _consumer_counts(r, c)
            if key[1] is None and r.filter.endswith(".>"):
                ungrouped.add(key[0])
    for key, count in stored.items():
        # a worker without groups consumes every group token of its type
        target = (key[0], None) if key[0] in ungrouped else key
        row(target).stored += count

    with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
        kv = await nc.jetstream().key_value(n.PARTITION_GROUPS_BUCKET)
        prefix = f"{n.TASK_STREAM}."
        for gkey, raw in (await kv_snapshot(kv, f"{n.TASK_STREAM}.*")).items():
            cg = gkey[len(prefix) :]
            r = row(_split_cg(cg))
            try:
                cfg = ElasticConfig.from_json(raw)
            except PartitionConfigError:
                r.partitions = -1  # unreadable config: shown, never hidden
                continue
            r.partitions = cfg.max_members
            r.members = list(cfg.members or ()) or [m.member for m in cfg.member_mappings or ()]
            gs = group_stream(n.TASK_STREAM, cg)
            r.consumers, r.queued, r.in_flight, r.redelivered, r.waiting_pulls = [], 0, 0, 0, 0
            members = await consumer_list(nc, gs)
            for c in members:
                _consumer_counts(r, c)
            with contextlib.suppress(nats.js.errors.Error, nats.errors.Error):
                si = await nc.jetstream().stream_info(gs)
                # work-queue stream: what is stored is either in flight or queued
                r.stored = int(si.state.messages or 0)
                r.queued = max(0, r.stored - r.in_flight)
                r.stream = gs

    now = datetime.now(UTC)
    for r in rows.values():
        if not with_age or r.stored + r.queued + r.in_flight == 0:
            continue
        filt = ">" if r.stream != n.TASK_STREAM else _age_filter(r)
        with contextlib.suppress(nats.errors.Error, ValueError):
            first = await _first_time(nc, r.stream, filt)
            if first is not None:
                r.oldest_age = max(0.0, (now - first).total_seconds())
        if r.partitions is None and r.consumers == [] and r.stored:
            r.queued = r.stored  # nobody consumes it: everything stored waits
    if workers is None:
        try:
            workers = await list_workers(nc)
        except NotProvisionedError:
            workers = []  # no directory: only waiting pulls show a live worker
    out = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] or ""))]
    attach_live(out, workers)
    return out


def workers_cell(r: QueueRow) -> Text:
    """The ``workers`` cell: live workers in the directory, ``pulling`` when only a
    pull request shows one (a worker not in the directory), else ``none``."""
    if r.live_workers:
        return Text(str(len(r.live_workers)))
    if r.live:
        return Text("pulling")
    busy = r.queued or r.in_flight or r.consumers or r.partitions is not None
    return Text("none", style="red" if busy else "dim")


def dead_notes(rows: list[QueueRow]) -> list[Text]:
    """One line per type and group that has consumers or tasks and no live worker."""
    out = []
    for r in rows:
        if r.live or not (r.consumers or r.queued or r.partitions is not None):
            continue
        what = safe(r.task_type) + (f" (group {safe(r.group)})" if r.group else "")
        have = []
        if r.consumers:
            have.append(plural(len(r.consumers), "consumer") + " left behind")
        if r.queued:
            have.append(plural(r.queued, "task") + " waiting")
        out.append(
            Text(f"no live worker for {what}" + (f": {', '.join(have)}" if have else ""), "red")
        )
    return out


def _age_filter(r: QueueRow) -> str:
    if r.filter:
        return r.filter
    return f"task.{r.task_type}.{r.group}.*" if r.group else f"task.{r.task_type}.*"


def fmt_age(s: float | None) -> str:
    """``4.2s``, ``42s``, ``5m07s``, ``3h05m``, ``2d03h``; ``-`` for none."""
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f}s"
    i = int(s)
    if i < 60:
        return f"{i}s"
    if i < 3600:
        return f"{i // 60}m{i % 60:02d}s"
    if i < 86400:
        return f"{i // 3600}h{i % 3600 // 60:02d}m"
    return f"{i // 86400}d{i % 86400 // 3600:02d}h"


def render(rows: list[QueueRow], title: str) -> Table:
    t = make_table(Text(title))
    t.add_column("type", no_wrap=True)
    t.add_column("group", no_wrap=True)
    for col in ("queued", "running", "redeliv", "oldest", "consumers", "workers", "pulls", "parts"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("members", overflow="fold")
    for r in rows:
        nobody = not r.consumers and r.partitions is None
        t.add_row(
            safe_text(r.task_type),
            safe_text(r.group or "-"),
            Text(str(r.queued), style="bold yellow" if r.queued and nobody else ""),
            str(r.in_flight),
            str(r.redelivered),
            fmt_age(r.oldest_age),
            Text(str(len(r.consumers)) if r.consumers else "none", style="red" if nobody else ""),
            workers_cell(r),
            str(r.waiting_pulls),
            "-" if r.partitions is None else ("?" if r.partitions < 0 else str(r.partitions)),
            safe_text(", ".join(r.members) or "-"),
        )
    return t


@click.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_conn
def queues(conn: ConnOptions, as_json: bool) -> None:
    """Per task type (and group): tasks queued, running (in flight: delivered,
    not yet acknowledged), redelivered, the age of the oldest, consumers and
    their waiting pull requests, partitions and members.

    Read from the stream and consumer info, so tasks and workers of any
    language are counted. `workers` counts live workers: fresh entries of the
    worker directory whose handlers include the type (and group); `pulling`
    when only a waiting pull request shows one. A consumer alone is no worker:
    types with consumers or tasks and no live worker are named below the table.

    \b
    Examples:
      jsworker queues
      jsworker queues --json | jq '.[] | select(.queued > 100)'
    """
    started = time.monotonic()
    rows = run(with_nc(conn, queue_report))
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    took = time.monotonic() - started
    title = f"{len(rows)} queue(s) on {conn.display_url}  ({took * 1000:.0f} ms)"
    console.print(render(rows, title))
    for note in dead_notes(rows):
        console.print(note)
