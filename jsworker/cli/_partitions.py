"""``jsworker partitions ...``: inspect and steer elastic consumer groups."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
from typing import Any

import click
import nats.js.errors
from nats.aio.client import Client as NATS
from rich.console import Group
from rich.live import Live
from rich.text import Text

from .. import _names as n
from .._dagnats import group_name as dagnats_group_name
from .._errors import NotProvisionedError
from .._partitions import cas_update
from .._pcg_config import (
    PRIORITY_GROUP,
    ElasticConfig,
    MemberMapping,
    PartitionConfigError,
    assignment,
    group_key,
    group_stream,
)
from .._services import kv_snapshot
from ._connect import ConnOptions, pass_conn, run, with_nc
from ._output import CLIError, console, make_table, plural, print_json, safe_text


async def _kv(nc: NATS) -> Any:
    try:
        return await nc.jetstream().key_value(n.PARTITION_GROUPS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise NotProvisionedError(
            f"KV bucket {n.PARTITION_GROUPS_BUCKET!r} does not exist: run `jsworker kv setup`"
        ) from None


def _cg(task_type: str, group: str | None) -> str:
    n.validate_task_type(task_type)
    if group is not None:
        n.validate_group(group)
    return n.consumer_name(task_type, group)


async def group_view(nc: NATS, cg: str, stream: str = n.TASK_STREAM) -> dict[str, Any]:
    """Everything ``show`` prints: config, partition -> member, pins, pending."""
    kv = await _kv(nc)
    try:
        try:
            entry = await kv.get(group_key(stream, cg))
        except nats.js.errors.KeyNotFoundError:
            # a DagNats-mode type's group is DagNats's: workers-{type}[-{group}]
            t, _, g = cg.partition("__g_")
            cg = dagnats_group_name(t, g or None)
            entry = await kv.get(group_key(stream, cg))
    except nats.js.errors.KeyNotFoundError:
        raise CLIError(
            f"no elastic group {group_key(stream, cg)} (is the type partitioned? "
            "`jsworker partitions list` shows the groups)"
        ) from None
    cfg = ElasticConfig.from_json(entry.value or b"", entry.revision or 0)
    js = nc.jetstream()
    pending: collections.Counter[int] = collections.Counter()
    consumers: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(nats.js.errors.NotFoundError):
        si = await js.stream_info(group_stream(stream, cg), subjects_filter=">")
        for subj, count in (si.state.subjects or {}).items():
            with contextlib.suppress(ValueError):
                pending[int(subj.split(".", 1)[0])] += count
        resp = await nc.request(
            f"$JS.API.CONSUMER.LIST.{group_stream(stream, cg)}", b"{}", timeout=5
        )
        for c in json.loads(resp.data).get("consumers") or []:
            pins = [pg for pg in c.get("priority_groups") or [] if pg.get("pinned_client_id")]
            consumers[c["name"]] = {
                "filters": c["config"].get("filter_subjects") or [],
                "pinned": bool(pins),
                "ack_pending": c.get("num_ack_pending", 0),
            }
    owners = assignment(cfg)
    return {
        "group": group_key(stream, cg),
        "stream": group_stream(stream, cg),
        "max_members": cfg.max_members,
        "members": list(cfg.members or ()),
        "member_mappings": [
            {"member": m.member, "partitions": list(m.partitions or ())}
            for m in cfg.member_mappings or ()
        ],
        "revision": cfg.revision,
        "partitions": [
            {
                "partition": p,
                "member": m,
                "consuming": bool(m and m in consumers),
                "pinned": bool(m and consumers.get(m, {}).get("pinned")),
                "pending": pending.get(p, 0),
            }
            for p, m in sorted(owners.items())
        ],
    }


#: the caption under ``show`` and ``watch``: what the columns mean
PARTITION_COLUMNS = (
    "consuming: the member's consumer on the group's stream exists; pinned: the server has "
    "pinned one client to it (priority policy pinned_client: only that client gets the "
    "partition's tasks; it pins at the first delivery, so an idle member shows no); "
    "pending: tasks stored for the partition"
)


def _render(view: dict[str, Any]) -> Group:
    t = make_table(  # names come from the KV entry: plain text, control characters escaped
        safe_text(
            f"{view['group']}  ({plural(view['max_members'], 'partition')}, "
            f"{plural(len(view['members']) or len(view['member_mappings']), 'member')}, "
            f"revision {view['revision']})"
        )
    )
    for col in ("partition", "member", "consuming", "pinned", "pending"):
        t.add_column(col, justify="right" if col in ("partition", "pending") else "left")
    for p in view["partitions"]:
        t.add_row(
            str(p["partition"]),
            safe_text(p["member"]) if p["member"] else Text("unassigned", style="red"),
            Text("yes", style="green") if p["consuming"] else Text("no", style="yellow"),
            "yes" if p["pinned"] else "no",
            str(p["pending"]),
        )
    return Group(t, Text(PARTITION_COLUMNS, style="dim"))


@click.group("partitions")
def partitions_group() -> None:
    """Elastic partitioned consumer groups (orbit.go pcgroups compatible).

    \b
    Examples:
      jsworker partitions list
      jsworker partitions show resize-image
    """


@partitions_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_conn
def list_groups(conn: ConnOptions, as_json: bool) -> None:
    """List the elastic groups in KV ``elastic-consumer-groups``.

    \b
    Examples:
      jsworker partitions list
    """

    async def go(nc: NATS) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for key, raw in sorted((await kv_snapshot(await _kv(nc))).items()):
            try:
                cfg = ElasticConfig.from_json(raw)
            except PartitionConfigError as e:
                out.append({"group": key, "error": str(e)})
                continue
            out.append(
                {
                    "group": key,
                    "max_members": cfg.max_members,
                    "members": list(cfg.members or ()),
                    "mapped": bool(cfg.member_mappings),
                    "filters": [p.filter for p in cfg.partitioning_filters or ()],
                }
            )
        return out

    groups = run(with_nc(conn, go))
    if as_json:
        print_json(groups)
        return
    t = make_table(Text(f"{len(groups)} elastic group(s)"))
    for col in ("group", "partitions", "members", "filters"):
        t.add_column(col)
    for g in groups:
        t.add_row(
            safe_text(g["group"]),
            safe_text(g.get("max_members", "?")),
            "mappings" if g.get("mapped") else str(len(g.get("members", []))),
            safe_text(", ".join(g.get("filters", [])) or g.get("error", "")),
        )
    console.print(t)


@partitions_group.command("show")
@click.argument("task_type")
@click.option("--group", default=None, help="Worker group, for workers started with groups.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_conn
def show(conn: ConnOptions, task_type: str, group: str | None, as_json: bool) -> None:
    """Partition -> member, whether it is consumed and pinned, and pending per partition.

    \b
    Examples:
      jsworker partitions show resize-image
      jsworker partitions show inference --group gpu --json
    """
    view = run(with_nc(conn, lambda nc: group_view(nc, _cg(task_type, group))))
    if as_json:
        print_json(view)
    else:
        console.print(_render(view))


@partitions_group.command("watch")
@click.argument("task_type")
@click.option("--group", default=None)
@click.option("--interval", type=float, default=0.5, show_default=True)
@click.option("--count", type=int, default=0, help="Stop after this many redraws (0: never).")
@pass_conn
def watch(
    conn: ConnOptions, task_type: str, group: str | None, interval: float, count: int
) -> None:
    """A live view of TASK_TYPE's partitions, redrawn as workers join and leave.

    \b
    Examples:
      jsworker partitions watch resize-image
    """
    cg = _cg(task_type, group)

    async def go(nc: NATS) -> None:
        view = await group_view(nc, cg)
        with Live(_render(view), console=console, refresh_per_second=4) as live:
            i = 0
            while count == 0 or i < count:
                await asyncio.sleep(interval)
                live.update(_render(await group_view(nc, cg)))
                i += 1

    with contextlib.suppress(KeyboardInterrupt):
        run(with_nc(conn, go))


@partitions_group.group("members")
def members_group() -> None:
    """Add or remove members by hand (e.g. for orbit.go consumers).

    \b
    Examples:
      jsworker partitions members add resize-image orbit-1
      jsworker partitions members remove resize-image orbit-1
    """


def _change(
    conn: ConnOptions, task_type: str, group: str | None, as_json: bool, mutate: Any, what: str
) -> None:
    cg = _cg(task_type, group)

    async def go(nc: NATS) -> dict[str, Any]:
        kv = await _kv(nc)
        try:
            await cas_update(kv, group_key(n.TASK_STREAM, cg), mutate)
        except nats.js.errors.KeyNotFoundError:
            raise CLIError(f"no elastic group {group_key(n.TASK_STREAM, cg)}") from None
        except PartitionConfigError as e:
            raise CLIError(str(e)) from None
        return await group_view(nc, cg)

    view = run(with_nc(conn, go))
    if as_json:
        print_json(view)
    else:
        console.print(Text(f"{what}:"))
        console.print(_render(view))


@members_group.command("add")
@click.argument("task_type")
@click.argument("members", nargs=-1, required=True)
@click.option("--group", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_conn
def members_add(
    conn: ConnOptions, task_type: str, members: tuple[str, ...], group: str | None, as_json: bool
) -> None:
    """Add MEMBERS to TASK_TYPE's group. Members added by hand are never removed
    automatically.

    \b
    Examples:
      jsworker partitions members add resize-image orbit-member-1
    """
    for m in members:
        n.validate_token(m, "member name")

    def mutate(c: ElasticConfig) -> ElasticConfig:
        for m in members:
            c = c.with_member(m)
        return c

    _change(conn, task_type, group, as_json, mutate, f"added {', '.join(members)}")


@members_group.command("remove")
@click.argument("task_type")
@click.argument("members", nargs=-1, required=True)
@click.option("--group", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_conn
def members_remove(
    conn: ConnOptions, task_type: str, members: tuple[str, ...], group: str | None, as_json: bool
) -> None:
    """Remove MEMBERS from TASK_TYPE's group (a live jsworker worker joins again).

    \b
    Examples:
      jsworker partitions members remove resize-image orbit-member-1
    """
    _change(
        conn,
        task_type,
        group,
        as_json,
        lambda c: c.without_members(set(members)),
        f"removed {', '.join(members)}",
    )


@partitions_group.group("mappings")
def mappings_group() -> None:
    """Pin partitions to members by hand (member mappings).

    \b
    Examples:
      jsworker partitions mappings set resize-image worker-aa=0,1 worker-bb=2,3
      jsworker partitions mappings clear resize-image
    """


@mappings_group.command("set")
@click.argument("task_type")
@click.argument("mappings", nargs=-1, required=True)
@click.option("--group", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_conn
def mappings_set(
    conn: ConnOptions, task_type: str, mappings: tuple[str, ...], group: str | None, as_json: bool
) -> None:
    """Set MAPPINGS (``member=p,p,...``), covering every partition exactly once.
    While mappings are set, automatic membership is off.

    \b
    Examples:
      jsworker partitions mappings set resize-image worker-aa=0,1 worker-bb=2,3
    """
    parsed = []
    for m in mappings:
        name, sep, parts = m.partition("=")
        try:
            nums = tuple(int(p) for p in parts.split(",") if p.strip())
        except ValueError:
            nums = ()
        if not sep or not name or not nums:
            raise click.BadParameter(f"{m!r} is not member=p,p,...", param_hint="MAPPINGS")
        parsed.append(MemberMapping(name, nums))
    _change(
        conn, task_type, group, as_json, lambda c: c.with_mappings(tuple(parsed)), "mappings set"
    )


@mappings_group.command("clear")
@click.argument("task_type")
@click.option("--group", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_conn
def mappings_clear(conn: ConnOptions, task_type: str, group: str | None, as_json: bool) -> None:
    """Clear the mappings: live workers join again by themselves.

    \b
    Examples:
      jsworker partitions mappings clear resize-image
    """
    _change(conn, task_type, group, as_json, lambda c: c.without_mappings(), "mappings cleared")


@partitions_group.command("delete")
@click.argument("task_type")
@click.option("--group", default=None)
@click.option("--force", is_flag=True, help="Delete even if tasks are still pending.")
@pass_conn
def delete(conn: ConnOptions, task_type: str, group: str | None, force: bool) -> None:
    """Delete TASK_TYPE's elastic group (config and partitioned stream).

    Refused while the partitioned stream still holds tasks, unless --force.

    \b
    Examples:
      jsworker partitions delete resize-image
    """
    cg = _cg(task_type, group)

    async def go(nc: NATS) -> None:
        js = nc.jetstream()
        kv = await _kv(nc)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            si = await js.stream_info(group_stream(n.TASK_STREAM, cg))
            if si.state.messages and not force:
                raise CLIError(
                    f"{group_stream(n.TASK_STREAM, cg)} still holds {si.state.messages} "
                    "task(s); drain it first or pass --force"
                )
            await js.delete_stream(group_stream(n.TASK_STREAM, cg))
        await kv.delete(group_key(n.TASK_STREAM, cg))

    run(with_nc(conn, go))
    console.print(Text(f"deleted elastic group {group_key(n.TASK_STREAM, cg)}"))
    sys.stdout.flush()


@partitions_group.command("unpin")
@click.argument("task_type")
@click.argument("member")
@click.option("--group", default=None)
@pass_conn
def unpin(conn: ConnOptions, task_type: str, member: str, group: str | None) -> None:
    """Unpin MEMBER's consumer (priority group PCG): the client instance pinned to it
    steps down and the next instance that pulls takes over (orbit.go's step-down).

    \b
    Examples:
      jsworker partitions unpin resize-image worker-0123456789abcdef
    """
    cg = _cg(task_type, group)
    n.validate_token(member, "member name")
    stream = group_stream(n.TASK_STREAM, cg)

    async def go(nc: NATS) -> dict[str, Any]:
        resp = await nc.request(
            f"$JS.API.CONSUMER.UNPIN.{stream}.{member}",
            json.dumps({"group": PRIORITY_GROUP}).encode(),
            timeout=5,
        )
        out: dict[str, Any] = json.loads(resp.data)
        return out

    resp = run(with_nc(conn, go))
    if resp.get("error"):
        raise CLIError(f"unpin refused: {resp['error'].get('description')}")
    console.print(Text(f"unpinned {member} on {stream}"))
