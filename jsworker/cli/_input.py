"""Command-line input: JSON arguments (text, ``-`` for stdin, ``@file``) and key=value."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ._output import CLIError


def read_json_arg(value: str | None, what: str = "input") -> Any:
    """``JSON`` text, ``-`` (stdin) or ``@file`` -> a JSON value (``None`` when absent)."""
    if value is None:
        return None
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise CLIError(f"{what} file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        text = value
    try:
        return json.loads(text)
    except ValueError as e:
        raise CLIError(f"{what} is not valid JSON ({e}); quote it, e.g. '{{\"n\": 1}}'") from None


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{p!r} is not key=value", param_hint="--metadata")
        out[k] = v
    return out
