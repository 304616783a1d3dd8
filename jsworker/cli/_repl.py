"""``jsworker repl``: a Python prompt with a live worker (see jsworker.interactive)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from .._dagnats import ENGINES
from ._connect import ConnOptions, library_errors, pass_conn, run


@click.command("repl")
@click.option(
    "--url",
    "repl_url",
    default=None,
    help="NATS server URL  [default: the root --url/NATS_URL when given, else an "
    "embedded server started for this REPL]",
)
@click.option("--group", default=None, help="Serve and submit to this worker group only.")
@click.option("--dev", is_flag=True, help="A private group for prototyping: dev-<your user>.")
@click.option(
    "--grace-period",
    type=click.FloatRange(0.1),
    default=10.0,
    help="Seconds in-flight tasks get to finish at Ctrl-D.",
)
@click.option(
    "--history",
    type=click.Path(dir_okay=False),
    default=None,
    help="History file  [default: $JSWORKER_HISTORY or ~/.jsworker_history]",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=None,
    help="dagnats: handlers serve DagNats workflow steps (docs/dagnats.md)  "
    "[default: $JSWORKER_ENGINE, else auto]",
)
@click.option("--no-banner", is_flag=True, help="Do not print the banner.")
@click.pass_context
@pass_conn
def repl(
    conn: ConnOptions,
    ctx: click.Context,
    repl_url: str | None,
    group: str | None,
    dev: bool,
    grace_period: float,
    history: str | None,
    engine: str | None,
    no_banner: bool,
) -> None:
    """An asyncio Python REPL sharing its event loop with a live worker.

    Define handlers with @handle("type"): they serve tasks at once; define one
    again to replace its code (in-flight tasks finish on the old one). Top-level
    await works; the worker keeps processing while the prompt waits. Ctrl-C
    interrupts the line, Ctrl-D stops the worker with its grace period and leaves
    every partition group.

    \b
    Examples:
      jsworker repl                               # embedded server, provisioned
      jsworker repl --url nats://127.0.0.1:4222 --dev
      NATS_URL=nats://nats:4222 jsworker repl --group dev-alice
      jsworker repl --url nats://dagnats:4222 --engine dagnats  # DagNats steps
    """
    # imported here: prompt-toolkit is not needed by the other commands
    from ..interactive._repl import run_repl
    from ..interactive._session import Session, connect, dev_group

    if dev and group:
        raise click.UsageError("give --group or --dev, not both")
    url = repl_url
    root = ctx.find_root()
    if url is None and root.get_parameter_source("url") not in (None, ParameterSource.DEFAULT):
        url = conn.url
    with library_errors():
        chosen = dev_group() if dev else group

    async def open_session() -> Session:
        return await connect(url, group=chosen, grace_period=grace_period, engine=engine)

    run(
        run_repl(
            open_session,
            history_file=Path(history) if history else None,
            banner=not no_banner,
        )
    )
