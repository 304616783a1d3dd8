"""The ``jsworker`` command line (click + rich). Lives inside the package."""

from __future__ import annotations

import click

from .._version import __version__
from ._common import ConnOptions
from ._dev import dev
from ._kv import kv_group
from ._misc import signal_group, workers
from ._partitions import partitions_group
from ._serve import serve
from ._task import task_group


@click.group(
    context_settings={
        "auto_envvar_prefix": "JSWORKER",
        "show_default": True,
        "help_option_names": ["-h", "--help"],
    }
)
@click.version_option(__version__, prog_name="jsworker")
@click.option(
    "--url",
    envvar=["NATS_URL", "JSWORKER_URL"],
    default="nats://127.0.0.1:4222",
    help="NATS server URL(s), comma-separated (env NATS_URL).",
)
@click.option(
    "--creds", type=click.Path(dir_okay=False), default=None, help="NATS credentials file (.creds)."
)
@click.option("--user", default=None, help="User name.")
@click.option("--password", default=None, help="Password (env JSWORKER_PASSWORD).")
@click.option("--token", default=None, help="Auth token (env JSWORKER_TOKEN).")
@click.option("--tls-ca", type=click.Path(dir_okay=False), default=None, help="CA certificate.")
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False), default=None, help="Client certificate."
)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="Client key.")
@click.option("--connect-timeout", type=float, default=5.0, help="Seconds.")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str,
    creds: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    connect_timeout: float,
) -> None:
    """jsworker: run task handlers on NATS JetStream.

    \b
    Examples:
      jsworker dev --demo                      # embedded server + demo, no setup needed
      jsworker kv setup --check                # CI: are streams and buckets in place?
      jsworker serve myapp.tasks:make_worker   # run your worker
      jsworker task submit send-email '{"to": "a@b.c"}' --wait
    """
    ctx.obj = ConnOptions(
        url=url,
        creds=creds,
        user=user,
        password=password,
        token=token,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        connect_timeout=connect_timeout,
    )


cli.add_command(kv_group)
cli.add_command(serve)
cli.add_command(dev)
cli.add_command(task_group)
cli.add_command(workers)
cli.add_command(signal_group)
cli.add_command(partitions_group)


def main() -> None:
    cli(prog_name="jsworker")


__all__ = ["cli", "main"]
