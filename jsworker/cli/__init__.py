"""The ``jsworker`` command line (click + rich), one module per command group:

* ``_connect``: the root's connection options, connecting, error mapping (``run``);
* ``_output`` / ``_input``: rich and JSON output, JSON arguments;
* ``_kv``, ``_serve`` (+ ``_importer``), ``_dev`` (+ ``_demo``), ``_task``,
  ``_signal``, ``_workers``, ``_partitions``, ``_dead``, ``_ratelimit``,
  ``_queues``, ``_top``, ``_repl``, ``_kernel``: the commands.

Errors the user can act on are one red line on stderr and exit code 1; usage errors
exit 2. Signal handlers are installed only here (``serve``, ``dev``), never by the
library.
"""

from __future__ import annotations

import click

from .._version import __version__
from ._connect import ConnOptions, connection_options
from ._dead import dead_group
from ._dev import dev
from ._kernel import kernel_group
from ._kv import kv_group
from ._partitions import partitions_group
from ._queues import queues
from ._ratelimit import ratelimit_group
from ._repl import repl
from ._serve import serve
from ._signal import signal_group
from ._task import task_group
from ._top import top
from ._workers import workers


@click.group(
    context_settings={
        "auto_envvar_prefix": "JSWORKER",
        "show_default": True,
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
    }
)
@click.version_option(__version__, prog_name="jsworker")
@connection_options
@click.pass_context
def cli(
    ctx: click.Context,
    url: str,
    creds: str | None,
    nkey: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    connect_timeout: float,
) -> None:
    """jsworker: run task handlers on NATS JetStream.

    Every option can also come from the environment: JSWORKER_<OPTION>
    (e.g. JSWORKER_TOKEN, JSWORKER_KV_SETUP_REPLICAS); the URL also from
    NATS_URL.

    \b
    Examples:
      jsworker dev --demo --exit-after-demo      # embedded server + demo, no setup
      jsworker kv setup --check                  # CI: streams and buckets in place?
      jsworker serve myapp.tasks:make_worker     # run your worker
      jsworker task submit send-email '{"to": "a@b.c"}' --wait
      jsworker --url nats://nats:4222 --creds app.creds workers
    """
    ctx.obj = ConnOptions(
        url=url,
        creds=creds,
        nkey=nkey,
        user=user,
        password=password,
        token=token,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        connect_timeout=connect_timeout,
    )


for command in (
    kv_group,
    serve,
    dev,
    task_group,
    workers,
    signal_group,
    partitions_group,
    dead_group,
    ratelimit_group,
    queues,
    top,
    repl,
    kernel_group,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point (``jsworker = jsworker.cli:main``)."""
    cli(prog_name="jsworker")


__all__ = ["cli", "main"]
