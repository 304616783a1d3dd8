"""Connection options of the root command, connecting, and running a command's coroutine
with library and NATS errors turned into one clear line (exit code 1).

Every NATS auth method is an option here: ``--user``/``--password`` (or in the URL),
``--token``, ``--nkey`` (a seed file), ``--creds`` (JWT + seed), and TLS with
``--tls-ca`` / mutual TLS with ``--tls-cert`` + ``--tls-key``. Secrets are registered
with :func:`._output.add_secret` as soon as the options are built, so no error line or
JSON output can print them; banners print :attr:`ConnOptions.display_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from .._errors import JSWorkerError
from .._loop import LoopFactory
from .._netcheck import HINT, scheme_problem, unreachable
from .._redact import redact_urls, split_url
from ._output import CLIError, add_secret, err

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
    nkey: str | None = None

    def __post_init__(self) -> None:
        add_secret(self.password)
        add_secret(self.token)
        for u in self.servers:
            parts = split_url(u)
            if parts is not None and parts.password:
                add_secret(parts.password)
            elif parts is not None and parts.username:  # nats://TOKEN@host
                add_secret(parts.username)

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def display_url(self) -> str:
        """:attr:`url` safe to print: ``nats://alice:***@host:4222`` for a password in
        the URL, ``nats://***@host:4222`` for a token in it."""
        return redact_urls(self.url)

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
            check_creds_file(self.creds)
            kw["user_credentials"] = self.creds
        if self.nkey:
            check_nkey_file(self.nkey)
            kw["nkeys_seed"] = self.nkey
        if self.user:
            kw["user"] = self.user
            kw["password"] = self.password or ""
        if self.token:
            kw["token"] = self.token
        if self.tls_key and not self.tls_cert:
            raise CLIError("--tls-key needs --tls-cert (the client certificate)")
        if self.tls_ca or self.tls_cert:
            try:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
                if self.tls_cert:
                    ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except ssl.SSLError as e:
                raise CLIError(f"cannot load the TLS files: {e.reason or e}") from None
            except (OSError, ValueError) as e:
                raise CLIError(f"cannot load the TLS files: {e}") from None
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
        url = self.display_url
        bad_scheme = scheme_problem(self.servers)
        if bad_scheme is not None:
            raise CLIError(bad_scheme)
        try:
            await nc.connect(**self.kwargs(name, reporter.cb))
        except nats.errors.NoServersError:
            raise CLIError(self._unreachable()) from None
        except (TimeoutError, ConnectionRefusedError):
            raise CLIError(self._unreachable()) from None
        except nats.errors.UnexpectedEOF:
            raise CLIError(self._closed_on_us()) from None
        except nats.errors.Error as e:
            text = str(e) or type(e).__name__
            if "authorization" in text.lower() or "authentication" in text.lower():
                raise CLIError(
                    f"the NATS server at {url} refused the credentials ({text.strip()}); "
                    "check --creds/--nkey/--user/--password/--token"
                ) from None
            if isinstance(e, nats.errors.ConnectionClosedError) or "connection lost" in (
                text.lower()
            ):
                raise CLIError(self._closed_on_us()) from None
            raise CLIError(f"cannot connect to {url}: {text}") from None
        except ssl.SSLCertVerificationError as e:
            raise CLIError(
                f"TLS: the certificate of {url} did not verify ({e.verify_message}); "
                "pass the CA that signed it with --tls-ca"
            ) from None
        except ssl.SSLError as e:
            if "CERTIFICATE_REQUIRED" in str(e.reason or e) and not self.tls_cert:
                raise CLIError(
                    f"the NATS server at {url} requires a client certificate (mutual TLS): "
                    "pass --tls-cert and --tls-key"
                ) from None
            raise CLIError(f"TLS handshake with {url} failed: {e.reason or e}") from None
        except OSError as e:
            # a server hanging up mid-handshake: asyncio's TLS transport says
            # ConnectionResetError("Connection lost"), or BrokenPipeError when the hang-up
            # races our first write
            hung_up = isinstance(e, ConnectionResetError | BrokenPipeError)
            if hung_up or "connection lost" in str(e).lower():
                raise CLIError(self._closed_on_us()) from None
            raise CLIError(f"cannot connect to {url}: {e.strerror or e}") from None
        if long_running:
            # nats-py reads these options on every disconnect. Connecting with reconnects
            # off and switching them on afterwards gives a clear error for a wrong URL or
            # credentials at start, and a worker that rides out server restarts later.
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 2.0
            reporter.loud = True

    def _unreachable(self) -> str:
        return unreachable(self.url, self.servers, HINT)

    def _closed_on_us(self) -> str:
        """The server dropped the connection before it was set up. Over TLS without a
        client certificate this is what a server that requires mutual TLS does."""
        hint = ""
        if (self.tls_ca or self.tls_cert or "tls://" in self.url) and not self.tls_cert:
            hint = (
                "; if it requires client certificates (mutual TLS), pass --tls-cert and --tls-key"
            )
        elif not self.tls_ca:
            hint = "; if it requires TLS, pass --tls-ca (or use a tls:// URL)"
        return f"the NATS server at {self.display_url} closed the connection while connecting{hint}"


def _nkeys() -> Any:
    try:
        import nkeys
    except ModuleNotFoundError:  # a dependency; only a broken install gets here
        raise CLIError("--creds and --nkey need the 'nkeys' package: pip install nkeys") from None
    return nkeys


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text("ascii")
    except UnicodeDecodeError:
        raise CLIError(f"{what} {path!r} is not a text file") from None
    except OSError as e:
        raise CLIError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def _check_seed(seed: str, path: str, what: str) -> None:
    nkeys = _nkeys()
    try:
        nkeys.from_seed(bytearray(seed.strip().encode())).wipe()
    except Exception:  # nkeys raises its own errors and binascii ones for bad base32
        raise CLIError(f"{what} {path!r} does not hold a valid NATS nkey seed") from None


def check_creds_file(path: str) -> None:
    """A ``.creds`` file must hold a user JWT and a seed. (nats-py loops forever on a
    file without the JWT marker, and shows a traceback for a bad seed.)"""
    lines = _read(path, "credentials file").splitlines()

    def after(marker: str) -> str:
        for i, line in enumerate(lines):
            if marker in line and i + 1 < len(lines) and lines[i + 1].strip():
                return lines[i + 1].strip()
        raise CLIError(
            f"credentials file {path!r} has no {marker} block: is it a NATS .creds file "
            "(as `nsc generate creds` writes)?"
        )

    jwt = after("BEGIN NATS USER JWT")
    if jwt.count(".") != 2:
        raise CLIError(f"credentials file {path!r}: the user JWT is malformed")
    _check_seed(after("BEGIN USER NKEY SEED"), path, "credentials file")


def check_nkey_file(path: str) -> None:
    """An nkey seed file: the seed (``SU...``) alone, as ``nk -gen user`` writes it."""
    _check_seed(_read(path, "nkey seed file"), path, "nkey seed file")


_denied: list[str] = []


def denied() -> str | None:
    """The last "permissions violation" the server reported in this process, if any."""
    return _denied[-1] if _denied else None


def denied_message(violation: str) -> str:
    text = violation.removeprefix("nats: ")
    return (
        f"the NATS server refused a request of this user ({text}); "
        "docs/security.md lists the permissions each role needs"
    )


class _ErrorReporter:
    """nats-py's ``error_cb`` (which must be a coroutine function, hence :meth:`cb`). Its
    default logs a traceback; here errors while connecting are reported by the command
    itself, and later ones (a long-running command's disconnects) as one yellow line.

    A request the user may not publish is dropped by the server, which tells the client
    only through this callback; the request then just times out. The violation is kept
    so that :func:`run` reports it instead of "did not answer in time"."""

    def __init__(self) -> None:
        self.loud = False

    async def cb(self, e: Exception) -> None:
        text = str(e) or type(e).__name__
        if "permissions violation" in text.lower():
            _denied.append(text)
        if self.loud:
            err(f"nats: {text}", style="yellow")


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
            help="NATS credentials file (.creds: user JWT + nkey seed).",
        ),
        click.option(
            "--nkey",
            type=click.Path(exists=True, dir_okay=False),
            help="NKey seed file (a user seed, SU...).",
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


class _QuietSSLEOF(logging.Filter):
    """asyncio logs "returning true from eof_received() has no effect when using ssl"
    (a warning) whenever a TLS peer closes a connection nats-py reads with
    ``eof_received`` returning true: noise after every successful TLS command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


_asyncio_filter = _QuietSSLEOF()


def _background_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An exception no task retrieved (nats-py's own tasks, e.g. closing a connection
    the server dropped, which uvloop reports where asyncio stays silent): one line on
    stderr, the traceback only at DEBUG."""
    exc = context.get("exception")
    what = context.get("message") or "background error"
    logging.getLogger("jsworker.cli").debug("%s", what, exc_info=exc)
    if isinstance(exc, ConnectionError | nats.errors.UnexpectedEOF):
        # the connection being torn down (after a refused login, say): the command says
        # what happened in its own one line; a second one would only be noise
        return
    err(f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what, style="dim")


def run(coro: Coroutine[Any, Any, T], *, loop_factory: LoopFactory | None = None) -> T:
    """Run a command's coroutine (on ``loop_factory``'s loop, default asyncio's);
    library and NATS errors become one red line, exit 1."""
    logging.getLogger("asyncio").addFilter(_asyncio_filter)  # idempotent
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.get_loop().set_exception_handler(_background_error)
            return runner.run(coro)
    except JSWorkerError as e:
        violation = denied()
        if violation and "time" in str(e).lower():  # a library timeout caused by a denial
            raise CLIError(denied_message(violation)) from None
        raise CLIError(str(e)) from None
    except nats.js.errors.ServiceUnavailableError:
        raise CLIError(
            "JetStream is not available on this server (is it enabled, and is this "
            "account allowed to use it?)"
        ) from None
    except nats.js.errors.APIError as e:
        if e.code is None and e.description in (None, "None"):
            raise CLIError(f"JetStream refused: {type(e).__name__}") from None
        raise CLIError(f"JetStream refused: {e.description or e}") from None
    except (nats.errors.TimeoutError, TimeoutError):
        violation = denied()
        if violation:
            raise CLIError(denied_message(violation)) from None
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
