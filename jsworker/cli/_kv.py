"""``jsworker kv setup``: provision (or check) the streams and KV buckets."""

from __future__ import annotations

import sys

import click
from rich.text import Text

from .._provision import OPTIONAL_BUCKETS, Mode, ProvisionResult, setup_all
from ._connect import ConnOptions, pass_conn, run, with_nc
from ._output import STATUS_STYLE, console, make_table, print_json

FAILING = ("missing", "drifted")


@click.group("kv")
def kv_group() -> None:
    """Streams and KV buckets.

    \b
    Examples:
      jsworker kv setup
      jsworker kv setup --check
    """


@kv_group.command("setup")
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=None,
    help="Replicas of new streams and buckets [default: follow the cluster: an "
    "existing TASK_QUEUES's, else 3 on 3+ servers, else 1]. Never scales down.",
)
@click.option("--check", is_flag=True, help="Change nothing; exit 1 on missing/drifted.")
@click.option("--dry-run", is_flag=True, help="Change nothing; show what would be done.")
@click.option(
    "--no-optional", is_flag=True, help="Skip the optional checkpoints and signals buckets."
)
@click.option("--no-update", is_flag=True, help="Report drift but never update a stream.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@pass_conn
def setup(
    conn: ConnOptions,
    replicas: int | None,
    check: bool,
    dry_run: bool,
    no_optional: bool,
    no_update: bool,
    as_json: bool,
) -> None:
    """Create the streams and KV buckets jsworker uses (idempotent).

    Streams TASK_QUEUES, STICKY_TASKS, WORKFLOW_HISTORY and DEAD_LETTERS; KV
    buckets workers, rate_limits, sticky_bindings, elastic-consumer-groups and
    the optional checkpoints and signals. One that exists with another
    configuration is "drifted"; what can change in place (max age, duplicate
    window, history, replicas, added subjects) is updated, the rest
    (retention, storage) is only reported. On a server DagNats provisioned
    nothing existing is changed: what differs only in DagNats's own settings is
    "compatible", and only what is missing is created. Statuses: created,
    exists, compatible, updated, drifted, missing (--check), would-create /
    would-update (--dry-run).

    \b
    Examples:
      jsworker kv setup
      jsworker kv setup --replicas 3 --url nats://n1:4222,nats://n2:4222
      jsworker kv setup --check           # CI: exit 1 if anything is missing or drifted
      jsworker kv setup --dry-run --json | jq '.[] | select(.status != "exists")'
      jsworker kv setup --no-optional     # no checkpoints/signals buckets
    """
    if check and dry_run:
        raise click.UsageError("--check and --dry-run are exclusive")
    mode: Mode = "check" if check else "dry_run" if dry_run else "apply"
    results: list[ProvisionResult] = run(
        with_nc(
            conn,
            lambda nc: setup_all(
                nc,
                replicas=replicas,
                mode=mode,
                optional=() if no_optional else OPTIONAL_BUCKETS,
                update=not no_update,
            ),
        )
    )
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        table = make_table(
            Text(f"jsworker kv setup ({mode.replace('_', '-')}) on {conn.display_url}")
        )
        for col in ("kind", "name", "status", "details"):
            table.add_column(col)
        for r in results:
            table.add_row(
                r.kind,
                r.name,
                Text(r.status, style=STATUS_STYLE.get(r.status, "")),
                Text("\n".join(r.details)),
            )
        console.print(table)
    if check and any(r.status in FAILING for r in results):
        sys.exit(1)
