"""``module:attr`` -> a Worker, with uvicorn's importer semantics.

``attr`` may be dotted (``app:workers.email``). It names either a
:class:`jsworker.Worker` instance or a factory (sync or async) taking the connected NATS
client and returning one.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from typing import IO, Any, NoReturn

from nats.aio.client import Client as NATS

from .._errors import JSWorkerError
from .._worker import Worker
from ._connect import ConnOptions
from ._output import CLIError, err

FORMAT_HINT = "'<module>:<attribute>', e.g. myapp.tasks:make_worker"


class ImportFromStringError(CLIError):
    """The module or attribute does not exist (a one-line message, no traceback)."""


def import_from_string(target: str) -> Any:
    """Import ``target``. A missing module or attribute is one clear line; an error raised
    *inside* the user's module (a nested ImportError, a SyntaxError, ...) shows its real
    traceback on stderr and exits 1, as uvicorn does."""
    module_name, sep, attrs = target.partition(":")
    if not sep or not module_name or not attrs:
        raise ImportFromStringError(f"import string {target!r} must be in format {FORMAT_HINT}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only "this very module (or a parent package) does not exist" is ours to explain
        if e.name == module_name or module_name.startswith(f"{e.name}."):
            raise ImportFromStringError(
                f"could not import module {module_name!r} (not found; is its directory on "
                "the path? see --app-dir)"
            ) from None
        _user_error(target, "importing it failed inside the module")
    except Exception:
        _user_error(target, "importing it failed inside the module")
    obj: Any = module
    try:
        for part in attrs.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportFromStringError(
            f"attribute {attrs!r} not found in module {module_name!r}"
        ) from None
    return obj


class UserCodeError(CLIError):
    """The user's code raised; its traceback is already on stderr (exit 1)."""

    def show(self, file: IO[Any] | None = None) -> None:
        pass


def _user_error(target: object, what: str) -> NoReturn:
    """An exception in the user's code: its real traceback, then exit 1. (Raised, not
    ``sys.exit``: inside ``asyncio.run`` the cleanup of the server and connection must
    still run.)"""
    name = target if isinstance(target, str) else getattr(target, "__qualname__", target)
    err(f"Error: {name!r}: {what}:")
    exc = sys.exc_info()[1]
    assert exc is not None
    print("".join(user_traceback(exc)), end="", file=sys.stderr)
    raise UserCodeError(what)


_OURS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)


def _is_ours(filename: str) -> bool:
    """jsworker's own frames and importlib's (``<frozen importlib._bootstrap>``, the
    loader's ``exec_module``) say nothing about the user's mistake."""
    return (
        filename.startswith(_OURS)
        or filename.startswith("<frozen importlib")
        or os.path.basename(os.path.dirname(filename)) == "importlib"
    )


def user_traceback(exc: BaseException) -> list[str]:
    """The traceback of ``exc`` (and of its causes) with jsworker's and importlib's
    frames left out: what remains is the user's code. When nothing would remain, the
    whole traceback is kept (a bug of ours must still be visible)."""
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    node: traceback.TracebackException | None = te
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        kept = [f for f in node.stack if not _is_ours(f.filename)]
        if kept:
            node.stack = traceback.StackSummary.from_list(kept)
        node = node.__cause__ or node.__context__
    return list(te.format())


def check_target(target: Any) -> None:
    """Refuse, before connecting, what can never become a Worker."""
    if isinstance(target, Worker):
        return
    if not callable(target):
        raise CLIError(
            f"the target is {_a(type(target).__name__)}; expected a jsworker.Worker or a "
            "factory taking the NATS connection and returning one"
        )
    try:
        inspect.signature(target).bind(object())
    except TypeError:
        raise CLIError(
            f"the factory {getattr(target, '__qualname__', target)!r} must take exactly one "
            "argument, the connected NATS client: def make_worker(nc): ..."
        ) from None
    except ValueError:  # no signature to inspect (some builtins): find out by calling it
        pass


def _a(noun: str) -> str:
    """``an int``, ``a str``: the article a noun takes (by its first letter)."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def needs_connection(target: Any) -> bool:
    """False for a Worker instance: it brings its own client (see :func:`build_worker`)."""
    return not isinstance(target, Worker)


async def build_worker(target: Any, nc: NATS | None, conn: ConnOptions) -> Worker:
    """Turn the imported object (checked by :func:`check_target`) into a Worker.

    * a factory ``(nc) -> Worker`` (sync or async) is called with the CLI's connection;
    * a Worker instance is used as-is; if its client is not connected yet (the module
      did ``Worker(nats.aio.client.Client())``) it is connected with the CLI's options.
    """
    check_target(target)
    if isinstance(target, Worker):
        if not target.nc.is_connected:
            if target.nc.is_closed:
                raise CLIError("the Worker's NATS client is closed")
            await conn.connect_client(target.nc, long_running=True, name="jsworker-serve")
        return target
    try:
        made = target(nc)
        if inspect.isawaitable(made):
            made = await made
    except JSWorkerError:
        raise  # the library's own message (a bad option, a bad name) says it all
    except Exception:
        _user_error(target, "the factory raised")
    if not isinstance(made, Worker):
        raise CLIError(f"the factory returned {type(made).__name__}, not a jsworker.Worker")
    return made
