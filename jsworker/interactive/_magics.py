"""``%load_ext jsworker``: the ``%jsworker`` magics and the per-cell hooks.

Everything runs on the kernel's own event loop. A line magic is synchronous in IPython,
so ``%jsworker ...`` lines are rewritten (an IPython input transformer) into an
``await`` of :func:`run_magic`; IPython then runs the cell as async code on the
kernel's loop (its autoawait), exactly as a cell with a top-level ``await``. That is
the only change made to a cell's text: lines without ``%jsworker`` are left as typed.

After every cell, :func:`after_cell` awaits :meth:`Session.sync` when the cell
registered a handler, so a consumer that cannot be created is the error *of that cell*.
The cell's text is not touched for it (IPython's own magics, ``%%time``, ``%timeit``,
``%%capture``, run their body as given): in a kernel, the kernel's ``do_execute`` is
wrapped (it is async, so the check is awaited on the loop after the cell, and a failure
turns the cell's reply into that error); elsewhere (terminal IPython, whose loop is idle
between cells) IPython's ``post_run_cell`` event runs the check on the session's loop.
A kernel started from ``jsworker kernel install`` connects the same way, before its
first cell (:func:`before_cell`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shlex
import sys
from typing import Any

from .._errors import ConfigError, JSWorkerError
from ._session import Session, connect

_MOD = "jsworker.interactive._magics"
_REF = f"__import__({_MOD!r}, fromlist=['_'])"
_LINE = re.compile(
    r"^(?P<indent>[ \t]*)(?:(?P<target>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*)?%jsworker\b(?P<args>.*)$"
)

#: the environment variable a kernel spec from ``jsworker kernel install`` sets
URL_ENV = "JSWORKER_KERNEL_URL"
GROUP_ENV = "JSWORKER_KERNEL_GROUP"
EMBEDDED = "embedded"


class _State:
    session: Session | None = None
    shell: Any = None
    autoconnect: str | None = None  # a URL (or "embedded") to connect to before cell 1
    autogroup: str | None = None
    last_trial: Any = None


state = _State()


def current() -> Session:
    """The session of this kernel (``ConfigError`` before ``%jsworker connect``)."""
    if state.session is None or state.session.closed:
        raise ConfigError("no jsworker session: run `%jsworker connect [URL]` first")
    return state.session


def attach(session: Session) -> None:
    """Make ``session`` this kernel's session (``connect()`` calls it inside IPython)."""
    state.session = session
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:  # pragma: no cover - only called when IPython is loaded
        return
    ip = get_ipython()  # type: ignore[no-untyped-call,unused-ignore]  # typed from IPython 9
    if ip is not None:
        install(ip)


# ---------------------------------------------------------------- extension
def load_ipython_extension(ip: Any) -> None:
    """Entry point of ``%load_ext jsworker`` (via ``jsworker.load_ipython_extension``)."""
    install(ip)
    url = os.environ.get(URL_ENV)
    if url and state.session is None:
        state.autoconnect = url
        state.autogroup = os.environ.get(GROUP_ENV) or None


def unload_ipython_extension(ip: Any) -> None:
    ip.input_transformers_cleanup[:] = [
        t for t in ip.input_transformers_cleanup if t is not _rewrite_magic_lines
    ]
    _unregister_post_run_cell(ip)
    state.shell = None  # the kernel's wrapped do_execute passes cells straight through


def install(ip: Any) -> None:
    if state.shell is ip:
        return
    state.shell = ip
    ip.input_transformers_cleanup.append(_rewrite_magic_lines)
    # a plain line magic too: `%lsmagic` lists it and `%jsworker?` shows the help; the
    # transformer above rewrites every `%jsworker` line before this could run
    ip.register_magic_function(_sync_magic, "line", "jsworker")
    if not ip.custom_exceptions:
        ip.set_custom_exc((JSWorkerError,), _one_line)
    _unregister_post_run_cell(ip)
    ip.events.register("post_run_cell", _post_run_cell)
    _check_after_kernel_cells(ip)
    _close_on_kernel_shutdown(ip)


def _unregister_post_run_cell(ip: Any) -> None:
    if _post_run_cell in ip.events.callbacks.get("post_run_cell", []):
        ip.events.unregister("post_run_cell", _post_run_cell)


def _one_line(
    shell: Any, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    """jsworker's own errors (a refused consumer, a missing stream, a bad option, a
    failed task) are messages for the person: one red line, no traceback. The error is
    still the cell's error, with its type."""
    stb = [f"\x1b[0;31m{etype.__name__}\x1b[0m: {value}"]
    shell._showtraceback(etype, value, stb)
    return stb


def _show_error(shell: Any) -> BaseException:
    """Show the exception being handled as IPython shows a cell's error (jsworker's own
    errors as one line); returns it."""
    etype, value, tb = sys.exc_info()
    assert etype is not None and value is not None
    if shell.custom_exceptions and issubclass(etype, shell.custom_exceptions):
        shell.CustomTB(etype, value, tb)
    else:
        shell.showtraceback()
    shell.last_execution_succeeded = False
    result = getattr(shell, "last_execution_result", None)
    if result is not None and result.error_in_exec is None:
        result.error_in_exec = value
    return value


def _error_reply(shell: Any, reply: dict[str, Any], err: BaseException) -> dict[str, Any]:
    """``reply`` (a kernel's ``execute_reply`` content) turned into the reply of a cell
    that failed with ``err`` (the traceback is the one just shown)."""
    return {
        **reply,
        "status": "error",
        "ename": type(err).__name__,
        "evalue": str(err),
        "traceback": list(getattr(shell, "_last_traceback", None) or []),
        "user_expressions": {},
    }


def _check_after_kernel_cells(ip: Any) -> None:
    """In an ipykernel, wrap this kernel instance's ``do_execute`` (nothing else is
    touched): before the cell, connect as a kernel spec says; after it, await
    :func:`after_cell`, whose failure becomes the cell's error. ``do_execute`` is the
    kernel's async entry point for a cell, outside IPython's own cell machinery, so a
    cell magic's nested run (``%%capture``) is never checked half-way."""
    kernel: Any = getattr(ip, "kernel", None)
    original = getattr(kernel, "do_execute", None)
    if kernel is None or original is None or getattr(original, "_jsworker", False):
        return

    async def do_execute(*args: Any, **kwargs: Any) -> Any:
        shell = state.shell
        if shell is None:  # the extension was unloaded
            return await _awaited(original(*args, **kwargs))
        if state.autoconnect is not None and state.session is None:
            try:
                await before_cell()
            except Exception:
                # the cell does not run: it would only fail on a missing `session`
                err = _show_error(shell)
                reply = {"execution_count": shell.execution_count, "payload": []}
                return _error_reply(shell, reply, err)
        reply = await _awaited(original(*args, **kwargs))
        try:
            await after_cell()
        except Exception:
            err = _show_error(shell)
            if isinstance(reply, dict):
                reply = _error_reply(shell, reply, err)
        return reply

    do_execute._jsworker = True  # type: ignore[attr-defined]
    kernel.do_execute = do_execute


async def _awaited(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _post_run_cell(result: Any) -> None:
    """IPython's ``post_run_cell`` event, for shells without a kernel (terminal IPython):
    their loop is idle between cells, so the check runs on it now. In a kernel the loop
    is running here and the wrapped ``do_execute`` awaits the check instead."""
    s = state.session
    if state.shell is None or s is None or s.closed or not s.pending:
        return
    if s.loop.is_closed() or s.loop.is_running():
        return
    try:
        s.loop.run_until_complete(s.sync())
    except Exception:
        err = _show_error(state.shell)  # as the cell's error (one line for jsworker's)
        if result is not None and result.error_in_exec is None:
            result.error_in_exec = err


def _close_on_kernel_shutdown(ip: Any) -> None:
    """A kernel shut down from Jupyter (or a restart) closes the session first, on the
    kernel's loop, so its partitions are handed back at once instead of after the
    liveness timeout. ipykernel has no shutdown hook for extensions, so this wraps
    this kernel instance's ``do_shutdown`` (nothing else is touched)."""
    kernel: Any = getattr(ip, "kernel", None)
    original = getattr(kernel, "do_shutdown", None)
    if kernel is None or original is None or getattr(original, "_jsworker", False):
        return

    async def do_shutdown(restart: bool) -> Any:
        s = state.session
        if s is not None and not s.closed:
            try:
                await _close_on_its_loop(s)
            except Exception as e:  # the kernel must still shut down
                print(f"jsworker: closing the session failed: {e}")
        result = original(restart)
        if inspect.isawaitable(result):
            result = await result
        return result

    do_shutdown._jsworker = True  # type: ignore[attr-defined]
    kernel.do_shutdown = do_shutdown


async def _close_on_its_loop(s: Session) -> None:
    """ipykernel handles shutdown requests on its control thread's loop; the session
    lives on the shell's loop, so it is closed there."""
    import asyncio

    here = asyncio.get_running_loop()
    if s.loop is here or s.loop.is_closed() or not s.loop.is_running():
        await s.close()
        return
    fut = asyncio.run_coroutine_threadsafe(s.close(), s.loop)
    await asyncio.wait_for(asyncio.wrap_future(fut), s.worker.grace_period + 10)


def _sync_magic(line: str) -> None:
    raise ConfigError(
        "`%jsworker` must start a line of a cell (it is rewritten into an `await`); "
        f"`get_ipython().run_line_magic` cannot run it. Commands: {', '.join(COMMANDS)}"
    )


_sync_magic.__doc__ = "jsworker magics: " + ", ".join(
    ["connect", "status", "live", "submit", "tail", "remove", "dead", "replay", "close"]
)


def _rewrite_magic_lines(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            out.append(line)
            continue
        call = f"await {_REF}.run_magic({m.group('args').strip()!r})"
        target = m.group("target")
        out.append(f"{m.group('indent')}{target + ' = ' if target else ''}{call}\n")
    return out


async def after_cell() -> None:
    """Run after every cell: confirm the live registrations it made (raise their
    errors). Only on the session's own loop (a kernel's subshell runs cells elsewhere)."""
    s = state.session
    if s is not None and not s.closed and s.pending and asyncio.get_running_loop() is s.loop:
        await s.sync()


async def before_cell() -> None:
    """Run before the first cell of a kernel started from ``jsworker kernel install``:
    connect as the kernel spec says, and bind ``session`` in the notebook."""
    url, state.autoconnect = state.autoconnect, None
    if url is None or state.session is not None:
        return
    s = await connect(None if url == EMBEDDED else url, group=state.autogroup)
    if state.shell is not None:
        state.shell.user_ns["session"] = s
    print(f"jsworker: connected to {s.url} as {s.worker.worker_id} (`session`)")


# ---------------------------------------------------------------- commands
COMMANDS = {
    "connect": "connect [URL] [--group G | --dev]  (no URL: an embedded server); binds `session`",
    "status": "status  (worker, handlers, partition maps, recent outcomes)",
    "live": "live [SECONDS] [--type T]  (the status kept up to date in this cell's output; "
    "--type: also T's partition map)",
    "submit": "submit TYPE [JSON] [--key K] [--group G] [--wait]",
    "tail": "tail [RUN_ID] [--seconds S] [--count N]",
    "remove": "remove TYPE  (drain, hand back partitions)",
    "dead": "dead TYPE FUNCTION [--last N]  (try FUNCTION on dead letters' inputs, locally)",
    "replay": "replay  (re-submit the dead letters the last trial fixed: `dead` or try_dead)",
    "close": "close  (stop the worker cleanly, leave every group)",
}


def _usage() -> str:
    return "usage: %jsworker " + " | ".join(COMMANDS)


def _opts(args: list[str], flags: set[str], valued: set[str]) -> tuple[list[str], dict[str, Any]]:
    pos: list[str] = []
    opts: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in flags:
            opts[a.lstrip("-")] = True
        elif a in valued:
            if i + 1 >= len(args):
                raise ConfigError(f"{a} needs a value")
            opts[a.lstrip("-")] = args[i + 1]
            i += 1
        elif a.startswith("--"):
            raise ConfigError(f"unknown option {a}")
        else:
            pos.append(a)
        i += 1
    return pos, opts


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {text!r}") from None
    if v <= 0:
        raise ConfigError(f"{what} must be > 0, got {text!r}")
    return v


_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _expand(line: str) -> str:
    """``$name`` / ``$name.attr`` from the notebook's namespace (as IPython's own magics
    do; ``{...}`` is left alone, so JSON arguments stay as typed)."""
    if state.shell is None or "$" not in line:
        return line
    ns = state.shell.user_ns

    def value(m: re.Match[str]) -> str:
        head, *attrs = m.group(1).split(".")
        if head not in ns:
            raise ConfigError(f"${head} is not defined in the notebook")
        v = ns[head]
        for a in attrs:
            v = getattr(v, a)
        return shlex.quote(str(v))

    return _VAR.sub(value, line)


_SUBMIT_RAW_JSON = re.compile(r"^\s*submit\s+(?P<type>[^\s'\"-][^\s'\"]*)\s+(?=[\[{])")
_QUOTE_HINT = (
    "quote the JSON as one argument, e.g. %jsworker submit TYPE '{\"a\": 1}' "
    '(an object or array may also be typed as is: %jsworker submit TYPE {"a": 1})'
)


def _split(line: str) -> tuple[list[str], Any]:
    """``shlex`` words of a magic line, and the input of a ``submit TYPE {...}`` /
    ``submit TYPE [...]`` typed without quotes (then left out of the words): an object
    or array right after the type is read as JSON up to its closing bracket, since the
    shell-like split would strip its quotes. ``...`` when there is none."""
    raw: Any = ...
    m = _SUBMIT_RAW_JSON.match(line)
    if m is not None:
        import json

        try:
            raw, end = json.JSONDecoder().raw_decode(line, m.end())
        except ValueError as e:
            raise ConfigError(f"input is not JSON: {e}; {_QUOTE_HINT}") from None
        rest = line[end:]
        if rest and not rest[0].isspace():
            raise ConfigError(f"input is not JSON: text after it: {rest.split()[0]!r}")
        line = f"submit {shlex.quote(m.group('type'))}{rest}"
    try:
        return shlex.split(_expand(line)), raw
    except ValueError as e:
        raise ConfigError(f"cannot parse `%jsworker {line}`: {e}") from None


async def run_magic(line: str) -> Any:
    """Run one ``%jsworker`` line; what it returns is the cell's value."""
    args, raw_input = _split(line)
    if not args or args[0] in ("help", "-h", "--help"):
        return "\n".join(f"%jsworker {v}" for v in COMMANDS.values())
    cmd, rest = args[0], args[1:]
    if cmd == "connect":
        pos, o = _opts(rest, {"--dev"}, {"--group"})
        if len(pos) > 1:
            raise ConfigError("connect takes at most one URL")
        from ._session import dev_group

        group = dev_group() if o.get("dev") else o.get("group")
        if state.session is not None and not state.session.closed:
            await state.session.close()
        s = await connect(pos[0] if pos else None, group=group)
        if state.shell is not None:
            state.shell.user_ns["session"] = s
        return s
    if cmd == "status":
        return await current().status()
    if cmd == "live":
        from ._display import live

        pos, o = _opts(rest, set(), {"--type"})
        every = _number(pos[0], "SECONDS") if pos else 1.0
        return await live(current(), every, [o["type"]] if "type" in o else [])
    if cmd == "submit":
        pos, o = _opts(rest, {"--wait"}, {"--key", "--group"})
        data: Any = None if raw_input is ... else raw_input
        if raw_input is not ... and len(pos) != 1:
            raise ConfigError(f"submit takes TYPE and one JSON input, got more: {pos[1:]}")
        if not 1 <= len(pos) <= 2:
            if len(pos) > 2:
                raise ConfigError(
                    f"submit takes TYPE and one JSON input, got {len(pos) - 1} words "
                    f"({' '.join(pos[1:])}): {_QUOTE_HINT}"
                )
            raise ConfigError("usage: %jsworker " + COMMANDS["submit"])
        if len(pos) == 2:
            import json

            try:
                data = json.loads(pos[1])
            except ValueError as e:
                raise ConfigError(f"input is not JSON ({pos[1]!r}: {e}); {_QUOTE_HINT}") from None
        return await current().submit(
            pos[0], data, key=o.get("key"), group=o.get("group"), wait=bool(o.get("wait"))
        )
    if cmd == "tail":
        pos, o = _opts(rest, set(), {"--seconds", "--count"})
        seconds = _number(o["seconds"], "--seconds") if "seconds" in o else 10.0
        count = int(_number(o["count"], "--count")) if "count" in o else None
        await current().tail(pos[0] if pos else None, seconds=seconds, count=count)
        return None
    if cmd == "remove":
        if len(rest) != 1:
            raise ConfigError("usage: %jsworker " + COMMANDS["remove"])
        await current().remove(rest[0])
        return None
    if cmd == "dead":
        from ._dead_loop import try_dead

        pos, o = _opts(rest, set(), {"--last"})
        if len(pos) != 2:
            raise ConfigError("usage: %jsworker " + COMMANDS["dead"])
        fn = _user_function(pos[1])
        last = int(_number(o["last"], "--last")) if "last" in o else 10
        state.last_trial = await try_dead(current(), pos[0], fn, last=last)
        return state.last_trial
    if cmd == "replay":
        if state.last_trial is None:
            raise ConfigError("nothing to replay: run `%jsworker dead TYPE FUNCTION` first")
        return await state.last_trial.replay()
    if cmd == "close":
        if state.session is not None:
            await state.session.close()
        return None
    raise ConfigError(f"unknown command {cmd!r}; {_usage()}")


def _user_function(name: str) -> Any:
    ns = state.shell.user_ns if state.shell is not None else {}
    try:
        fn = eval(name, ns)  # a name or attribute path typed by the person in the cell
    except Exception as e:
        raise ConfigError(f"{name!r} is not defined in the notebook: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{name!r} is not a function")
    return fn


__all__ = [
    "JSWorkerError",
    "after_cell",
    "attach",
    "current",
    "load_ipython_extension",
    "run_magic",
]
