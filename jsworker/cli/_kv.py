"""``jsworker kv setup``: provision streams and KV buckets."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from .._provision import Mode, ProvisionResult, setup_all
from ._common import ConnOptions, console, pass_conn, print_json, run, with_nc

STYLE = {
    "created": "green",
    "exists": "dim",
    "updated": "yellow",
    "drifted": "red",
    "missing": "red",
    "would-create": "cyan",
    "would-update": "cyan",
}


@click.group("kv")
def kv_group() -> None:
    """Streams and KV buckets."""


@kv_group.command("setup")
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=1,
    show_default=True,
    help="Replicas for new streams and buckets (3 on a 3-node cluster).",
)
@click.option(
    "--check", is_flag=True, help="Change nothing; exit 1 if anything is missing or drifted."
)
@click.option(
    "--dry-run", is_flag=True, help="Change nothing; show what would be created or updated."
)
@click.option(
    "--no-optional", is_flag=True, help="Skip the optional checkpoints and signals buckets."
)
@click.option("--no-update", is_flag=True, help="Report drift but never update existing streams.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_conn
def setup(
    conn: ConnOptions,
    replicas: int,
    check: bool,
    dry_run: bool,
    no_optional: bool,
    no_update: bool,
    as_json: bool,
) -> None:
    """Create the streams and KV buckets jsworker uses (idempotent).

    Streams TASK_QUEUES, STICKY_TASKS, WORKFLOW_HISTORY, DEAD_LETTERS; buckets workers,
    rate_limits, sticky_bindings, elastic-consumer-groups, and the optional checkpoints
    and signals. An existing one with another config is reported as drifted, and
    updated when the change is safe (max age, duplicate window, replicas, subjects).

    \b
    Examples:
      jsworker kv setup
      jsworker kv setup --replicas 3
      jsworker kv setup --check          # in CI: exit 1 on anything missing or drifted
      jsworker kv setup --dry-run --json
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
                optional=() if no_optional else ("checkpoints", "signals"),
                update=not no_update,
            ),
        )
    )
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        table = Table(title=f"jsworker kv setup ({mode.replace('_', '-')})")
        for col in ("kind", "name", "status", "details"):
            table.add_column(col)
        for r in results:
            st = STYLE.get(r.status, "")
            table.add_row(r.kind, r.name, f"[{st}]{r.status}[/]", "\n".join(r.details))
        console.print(table)
    if check and any(r.status in ("missing", "drifted") for r in results):
        sys.exit(1)
