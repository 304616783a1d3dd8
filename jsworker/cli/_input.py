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
        text = _read_file(Path(value[1:]), what)
    else:
        text = value
    try:
        return json.loads(text)
    except ValueError as e:
        raise CLIError(f"{what} is not valid JSON ({e}); quote it, e.g. '{{\"n\": 1}}'") from None


def _read_file(path: Path, what: str) -> str:
    """``@file``'s text (UTF-8), or one clear line saying why not."""
    if path.is_dir():
        raise CLIError(f"{what} file {str(path)!r} is a directory")
    if not path.exists():
        raise CLIError(f"{what} file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read {what} file {str(path)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(
            f"{what} file {str(path)!r} is not UTF-8 text (byte {e.start}: "
            f"{data[e.start : e.start + 1]!r}); JSON input must be UTF-8"
        ) from None


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{p!r} is not key=value", param_hint="--metadata")
        out[k] = v
    return out
