"""Connection options of the root command, connecting, and running a command's coroutine
with library and NATS errors turned into one clear line (exit code 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from .._errors import JSWorkerError
from .._loop import LoopFactory
from ._output import CLIError, err

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL = "nats://127.0.0.1:4222"


@dataclass
class ConnOptions:
    """How to reach NATS; filled from the root command's options."""

    url: str = DEFAULT_URL
    creds: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def kwargs(self, name: str, error_cb: Callable[[Exception], Awaitable[None]]) -> dict[str, Any]:
        """``nats.connect`` keyword arguments, always with ``allow_reconnect=False``:
        the first connection must fail fast and say why (see :meth:`connect`)."""
        kw: dict[str, Any] = {
            "servers": self.servers,
            "connect_timeout": self.connect_timeout,
            "name": name,
            "allow_reconnect": False,
            # nats-py treats a negative value as "forever"; 1 = try each server once
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
            "error_cb": error_cb,
        }
        if self.creds:
            kw["user_credentials"] = self.creds
        if self.user:
            kw["user"] = self.user
            kw["password"] = self.password or ""
        if self.token:
            kw["token"] = self.token
        if self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            kw["tls"] = ctx
        return kw

    async def connect(self, *, long_running: bool = False, name: str = "jsworker-cli") -> NATS:
        """A connected client. One-shot commands never reconnect; ``long_running``
        (serve, dev) reconnects forever once the *first* connection succeeded."""
        nc = NATS()
        await self.connect_client(nc, long_running=long_running, name=name)
        return nc

    async def connect_client(
        self, nc: NATS, *, long_running: bool = False, name: str = "jsworker-cli"
    ) -> None:
        """Connect an existing, not yet connected client (a module-level Worker's)."""
        reporter = _ErrorReporter()
        try:
            await nc.connect(**self.kwargs(name, reporter.cb))
        except nats.errors.NoServersError:
            raise CLIError(self._unreachable()) from None
        except (TimeoutError, ConnectionRefusedError):
            raise CLIError(self._unreachable()) from None
        except nats.errors.Error as e:
            text = str(e) or type(e).__name__
            if "authorization" in text.lower() or "authentication" in text.lower():
                raise CLIError(
                    f"the NATS server at {self.url} refused the credentials ({text.strip()}); "
                    "check --creds/--user/--password/--token"
                ) from None
            raise CLIError(f"cannot connect to {self.url}: {text}") from None
        except ssl.SSLError as e:
            raise CLIError(f"TLS handshake with {self.url} failed: {e}") from None
        except OSError as e:
            raise CLIError(f"cannot connect to {self.url}: {e.strerror or e}") from None
        if long_running:
            # nats-py reads these options on every disconnect. Connecting with reconnects
            # off and switching them on afterwards gives a clear error for a wrong URL or
            # credentials at start, and a worker that rides out server restarts later.
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 2.0
            reporter.loud = True

    def _unreachable(self) -> str:
        return (
            f"cannot reach a NATS server at {self.url} (is it running? set --url or NATS_URL; "
            "`jsworker dev` starts one)"
        )


class _ErrorReporter:
    """nats-py's ``error_cb`` (which must be a coroutine function, hence :meth:`cb`). Its
    default logs a traceback; here errors while connecting are reported by the command
    itself, and later ones (a long-running command's disconnects) as one yellow line."""

    def __init__(self) -> None:
        self.loud = False

    async def cb(self, e: Exception) -> None:
        if self.loud:
            err(f"nats: {e or type(e).__name__}", style="yellow")


pass_conn = click.make_pass_decorator(ConnOptions)


def connection_options(f: F) -> F:
    """The root command's connection options (one definition, used by every command)."""
    opts = [
        click.option(
            "--url",
            envvar=["NATS_URL", "JSWORKER_URL"],
            default=DEFAULT_URL,
            help="NATS server URL(s), comma-separated (env NATS_URL or JSWORKER_URL).",
        ),
        click.option(
            "--creds",
            type=click.Path(exists=True, dir_okay=False),
            help="NATS credentials file (.creds).",
        ),
        click.option("--user", help="User name (with --password)."),
        click.option("--password", help="Password (env JSWORKER_PASSWORD)."),
        click.option("--token", help="Auth token (env JSWORKER_TOKEN)."),
        click.option(
            "--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate (PEM)."
        ),
        click.option(
            "--tls-cert",
            type=click.Path(exists=True, dir_okay=False),
            help="Client certificate (PEM, with --tls-key).",
        ),
        click.option(
            "--tls-key", type=click.Path(exists=True, dir_okay=False), help="Client key (PEM)."
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(0.1),
            default=5.0,
            help="Seconds to wait for the server.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _background_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception no task retrieved (nats-py's own tasks, e.g. closing a connection
    the server dropped, which uvloop reports where asyncio stays silent): one line on
    stderr, the traceback only at DEBUG."""
    exc = context.get("exception")
    what = context.get("message") or "background error"
    err(f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what, style="dim")
    logging.getLogger("jsworker.cli").debug("%s", what, exc_info=exc)


def run(coro: Coroutine[Any, Any, T], *, loop_factory: LoopFactory | None = None) -> T:
    """Run a command's coroutine (on ``loop_factory``'s loop, default asyncio's);
    library and NATS errors become one red line, exit 1."""
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.get_loop().set_exception_handler(_background_error)
            return runner.run(coro)
    except JSWorkerError as e:
        raise CLIError(str(e)) from None
    except nats.js.errors.APIError as e:
        raise CLIError(f"JetStream refused: {e.description or e}") from None
    except nats.errors.TimeoutError:
        raise CLIError("the NATS server did not answer in time") from None
    except (nats.errors.ConnectionClosedError, nats.errors.StaleConnectionError):
        raise CLIError("the connection to NATS was lost") from None
    except nats.js.errors.NoStreamResponseError:
        # what nats-py raises when a JetStream publish matches no stream
        raise CLIError(
            "no stream captures this subject: run `jsworker kv setup` to create TASK_QUEUES"
        ) from None
    except nats.errors.NoRespondersError:
        raise CLIError("no responders (is JetStream enabled on the server?)") from None
    except nats.errors.Error as e:
        raise CLIError(f"NATS: {e}") from None
    except KeyboardInterrupt:
        err("interrupted", style="yellow")
        sys.exit(130)


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """For checks made before connecting (names, options): the library's message,
    one line, exit 1."""
    try:
        yield
    except JSWorkerError as e:
        raise CLIError(str(e)) from None


async def with_nc(conn: ConnOptions, fn: Callable[[NATS], Awaitable[T]]) -> T:
    """Connect (no reconnects), run ``fn(nc)``, close."""
    nc = await conn.connect()
    try:
        return await fn(nc)
    finally:
        await nc.close()
