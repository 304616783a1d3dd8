"""``jsworker kernel install``: a Jupyter kernel with jsworker loaded and connected."""

from __future__ import annotations

import click

from .._dagnats import ENGINES
from .._redact import redact_urls
from ..interactive._kernel import DEFAULT_NAME, install_kernel
from ._connect import library_errors
from ._output import console, print_json


@click.group("kernel")
def kernel_group() -> None:
    """Jupyter kernels for the interactive mode.

    \b
    Examples:
      jsworker kernel install --url nats://127.0.0.1:4222
    """


@kernel_group.command("install")
@click.option(
    "--url",
    "kernel_url",
    default=None,
    help="NATS server URL the kernel connects to  [default: an embedded server per kernel]",
)
@click.option("--name", default=DEFAULT_NAME, help="Kernel spec name (letters, digits, ._-).")
@click.option("--group", default=None, help="Worker group the kernel's session serves.")
@click.option(
    "--prefix",
    type=click.Path(file_okay=False),
    default=None,
    help="Install under this prefix (e.g. a virtualenv's sys.prefix)  [default: the user's "
    "Jupyter data dir]",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=None,
    help="The session worker's engine: dagnats to serve DagNats workflow steps "
    "(docs/dagnats.md)  [default: $JSWORKER_ENGINE, else auto]",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def install(
    kernel_url: str | None,
    name: str,
    group: str | None,
    prefix: str | None,
    engine: str | None,
    as_json: bool,
) -> None:
    """Install a kernel spec that starts an ipykernel with `%load_ext jsworker` and,
    before the first cell runs, a session connected to --url (bound to `session`).

    \b
    Examples:
      jsworker kernel install                                # embedded server
      jsworker kernel install --url nats://127.0.0.1:4222 --name jsworker-local
      jsworker kernel install --url nats://nats:4222 --group dev-alice --json
      jsworker kernel install --url nats://nats:4222 --engine dagnats --name dagnats
    """
    with library_errors():
        path = install_kernel(kernel_url, name=name, group=group, prefix=prefix, engine=engine)
    if as_json:
        shown = redact_urls(kernel_url) if kernel_url else None  # the spec file keeps it
        print_json({"name": name, "path": path, "url": shown, "group": group, "engine": engine})
    else:
        console.print(f"installed kernel spec {name!r} in {path}", soft_wrap=True)
