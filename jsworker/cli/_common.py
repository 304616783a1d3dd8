"""Shared CLI plumbing: connection options, running coroutines, errors, input, output."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from rich.console import Console

from .._errors import JSWorkerError

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)


@dataclass
class ConnOptions:
    """How to reach NATS; filled from the root command's options (env ``NATS_URL``,
    ``JSWORKER_*``)."""

    url: str = "nats://127.0.0.1:4222"
    creds: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0

    def check(self) -> None:
        if self.creds and not Path(self.creds).is_file():
            raise click.ClickException(f"credentials file {self.creds!r} does not exist")

    async def connect(self, *, reconnect: bool = False, name: str = "jsworker-cli") -> NATS:
        kwargs: dict[str, Any] = {
            "servers": [u.strip() for u in self.url.split(",") if u.strip()],
            "connect_timeout": self.connect_timeout,
            "name": name,
            "allow_reconnect": reconnect,
            # 0 would retry forever in nats-py; 1 means "try each server once"
            "max_reconnect_attempts": -1 if reconnect else 1,
            "reconnect_time_wait": 2 if reconnect else 0.1,
        }
        if self.creds:
            kwargs["user_credentials"] = self.creds
        if self.user:
            kwargs["user"] = self.user
            kwargs["password"] = self.password or ""
        if self.token:
            kwargs["token"] = self.token
        if self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            kwargs["tls"] = ctx

        async def _quiet(e: Exception) -> None:  # errors are reported by the command
            return None

        kwargs["error_cb"] = _quiet
        try:
            return await nats.connect(**kwargs)
        except nats.errors.NoServersError:
            raise click.ClickException(
                f"cannot reach a NATS server at {self.url} (is it running? set --url or "
                "NATS_URL; `jsworker dev` starts one)"
            ) from None
        except (nats.errors.AuthorizationError, nats.errors.Error) as e:
            text = str(e) or type(e).__name__
            if "authorization" in text.lower() or "auth" in type(e).__name__.lower():
                raise click.ClickException(
                    f"the NATS server at {self.url} refused the credentials ({text})"
                ) from None
            raise click.ClickException(f"cannot connect to {self.url}: {text}") from None
        except OSError as e:
            raise click.ClickException(f"cannot connect to {self.url}: {e}") from None


pass_conn = click.make_pass_decorator(ConnOptions)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning library and NATS errors into one clear line."""
    try:
        return asyncio.run(coro)
    except JSWorkerError as e:
        raise click.ClickException(str(e)) from None
    except nats.js.errors.APIError as e:
        raise click.ClickException(f"JetStream refused: {e.description or e}") from None
    except nats.errors.TimeoutError:
        raise click.ClickException("the NATS server did not answer in time") from None
    except nats.errors.ConnectionClosedError:
        raise click.ClickException("the connection to NATS was closed") from None


async def with_nc(conn: ConnOptions, fn: Callable[[NATS], Awaitable[T]]) -> T:
    nc = await conn.connect()
    try:
        return await fn(nc)
    finally:
        await nc.close()


def read_json_arg(value: str | None, what: str = "input") -> Any:
    """``JSON`` text, ``-`` (stdin) or ``@file`` -> a JSON value (``None`` when absent)."""
    if value is None:
        return None
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise click.ClickException(f"{what} file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        text = value
    try:
        return json.loads(text)
    except ValueError as e:
        raise click.ClickException(f"{what} is not valid JSON: {e}") from None


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{p!r} is not key=value", param_hint="--metadata")
        out[k] = v
    return out
