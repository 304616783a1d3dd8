"""A Jupyter kernel spec that starts an ipykernel with jsworker loaded and connected."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from .._dagnats import ENGINE_ENV, engine_setting
from .._errors import ConfigError
from .._redact import redact_urls
from ._magics import EMBEDDED, GROUP_ENV, URL_ENV

DEFAULT_NAME = "jsworker"
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def kernel_spec(
    url: str | None,
    group: str | None = None,
    name: str = DEFAULT_NAME,
    engine: str | None = None,
) -> dict[str, Any]:
    """The ``kernel.json`` content: this Python, ipykernel, ``--ext jsworker``, and the
    URL in the environment (the extension connects before the first cell runs);
    ``engine`` (``dagnats`` / ``standalone`` / ``auto``) as ``$JSWORKER_ENGINE``."""
    env = {URL_ENV: url or EMBEDDED}
    if group:
        env[GROUP_ENV] = group
    if engine:
        env[ENGINE_ENV] = engine_setting(engine)
    return {
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--ext=jsworker",
        ],
        # shown in Jupyter's kernel list: the URL without its password or token
        "display_name": f"Python (jsworker: {redact_urls(url) if url else 'embedded server'}"
        + (f", group {group}" if group else "")
        + (f", {engine} mode" if engine else "")
        + ")",
        "language": "python",
        "env": env,
        "metadata": {
            "jsworker": {"url": redact_urls(url) if url else None, "group": group, "name": name}
        },
    }


def install_kernel(
    url: str | None,
    *,
    name: str = DEFAULT_NAME,
    group: str | None = None,
    user: bool = True,
    prefix: str | None = None,
    engine: str | None = None,
) -> str:
    """Install the kernel spec; returns the directory it was installed to. Needs
    ``jupyter_client`` (the ``notebook`` extra)."""
    if not _NAME.match(name):
        raise ConfigError(f"kernel name {name!r} may only hold letters, digits, '.', '_', '-'")
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        raise ConfigError(
            "jupyter_client is not installed: pip install 'jsworker[notebook]'"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(
            json.dumps(kernel_spec(url, group, name, engine), indent=1)
        )
        return str(
            KernelSpecManager().install_kernel_spec(
                tmp, kernel_name=name, user=user and prefix is None, prefix=prefix
            )
        )
