"""``jsworker repl``: an asyncio Python REPL on prompt-toolkit, sharing its loop with a
live worker.

Built on prompt-toolkit alone (``PromptSession.prompt_async``), not on ptpython's
``embed(return_asyncio_coroutine=True)``: the behaviour that matters here is what
Ctrl-C does, and ptpython's embedding leaves that to the host. Here:

* while the prompt waits, the worker's pull loops keep running on the same loop;
* a statement is compiled with ``PyCF_ALLOW_TOP_LEVEL_AWAIT``: ``await`` works at the
  top level; an async statement runs as a task, so Ctrl-C cancels *that task* (the
  worker's tasks are never interrupted); a synchronous statement gets Python's usual
  ``KeyboardInterrupt``, which can only land in the statement since it holds the loop;
* Ctrl-C at the prompt clears the line; Ctrl-D stops the worker with its grace period
  (in-flight tasks finish, every partition group is left) and exits;
* after a statement that registered a handler, :meth:`Session.sync` is awaited, so a
  consumer that cannot be created is reported at that prompt.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import codeop
import contextlib
import inspect
import os
import re
import rlcompleter
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.patch_stdout import patch_stdout

from .._errors import JSWorkerError
from ._session import Session

PS1 = ">>> "
PS2 = "... "
_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")

BANNER = """\
jsworker {version} REPL: worker {worker} on {url}{group}, {engine} mode
  @handle("type") def/async def ...   live at once; define it again to replace it
  await submit("type", {{...}}, wait=True)   await tail(run_id)   await status()
  await remove("type")   await partition_map("type")   session, worker, client
  Ctrl-C interrupts the line, Ctrl-D leaves (the worker stops with its grace period){embedded}"""


def default_history() -> Path:
    return Path(os.environ.get("JSWORKER_HISTORY") or Path.home() / ".jsworker_history")


class NamespaceCompleter(Completer):
    """Completion of names and attributes in the REPL's namespace (the standard
    library's ``rlcompleter``, which evaluates only the part before the last dot)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._rl = rlcompleter.Completer(namespace)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        m = _WORD.search(document.text_before_cursor)
        if m is None:
            return
        word = m.group(0)
        seen: set[str] = set()
        for state in range(200):
            try:
                c = self._rl.complete(word, state)
            except Exception:
                return
            if c is None:
                return
            if c in seen:
                continue
            seen.add(c)
            yield Completion(c, start_position=-len(word))


def namespace(session: Session) -> dict[str, Any]:
    import jsworker

    return {
        "__name__": "__jsworker_repl__",
        "__builtins__": builtins,
        "asyncio": asyncio,
        "jsworker": jsworker,
        "session": session,
        "worker": session.worker,
        "client": session.client,
        "handle": session.handle,
        "handle_singleton": session.handle_singleton,
        "remove": session.remove,
        "submit": session.submit,
        "tail": session.tail,
        "status": session.status,
        "partitions": session.partitions,
        "partition_map": session.partition_map,
        "TaskContext": jsworker.TaskContext,
    }


class Repl:
    def __init__(
        self,
        session: Session,
        *,
        history: History | None = None,
    ) -> None:
        self.session = session
        self.ns = namespace(session)
        self.prompt = PromptSession[str](
            history=history or InMemoryHistory(),
            completer=NamespaceCompleter(self.ns),
            complete_while_typing=False,
            key_bindings=_paste_bindings(),
        )
        self._compile = codeop.CommandCompiler()
        self._compile.compiler.flags |= _FLAGS
        self.statements = 0

    async def read(self) -> str | None:
        """One complete statement (several lines for a block), ``None`` at Ctrl-D."""
        lines: list[str] = []
        while True:
            try:
                # stdout is patched only while the prompt is shown: prints from tasks
                # then go above the prompt; a statement's own output is written at once
                with patch_stdout(raw=True):
                    line = await self.prompt.prompt_async(
                        PS2 if lines else PS1, default=indent_for(lines)
                    )
            except KeyboardInterrupt:
                print("KeyboardInterrupt")
                lines = []
                continue
            except EOFError:
                if lines:
                    lines = []
                    print()
                    continue
                return None
            except Exception as e:  # e.g. a key racing the prompt's exit; keep the REPL
                print(f"prompt error: {type(e).__name__}: {e}", file=sys.stderr)
                lines = []
                continue
            if lines and not line.strip():
                line = ""  # only the auto-indent left: the block ends here
            lines.append(line)
            source = "\n".join(lines)
            try:
                code = self._compile(source, "<repl>", "single")
            except (SyntaxError, OverflowError, ValueError):
                return source  # complete but wrong: exec() reports it
            if code is not None:
                return source

    async def run(self) -> None:
        while True:
            source = await self.read()
            if source is None:
                return
            if not source.strip():
                continue
            await self.execute(source)

    async def execute(self, source: str) -> None:
        """Run one statement; print its errors (never raise). A statement that
        registered, redefined or removed handlers ends with one line per change once
        it is live on the worker (``send-email v1 live``)."""
        self.statements += 1
        before = self._versions()
        try:
            code = compile(source, "<repl>", "single", flags=_FLAGS)
        except (SyntaxError, OverflowError, ValueError):
            self._show_exception()
            return
        try:
            if code.co_flags & inspect.CO_COROUTINE:
                await self._run_async(code)
            else:
                with _sigint_raises():
                    eval(code, self.ns)
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("KeyboardInterrupt")
        except SystemExit:
            raise
        except BaseException:
            self._show_exception()
        finally:
            sys.stdout.flush()
        if self.session.pending:
            try:
                await self.session.sync()
            except Exception:
                self._show_exception(brief=True)
        for line in changes(before, self._versions()):
            print(line, flush=True)

    def _versions(self) -> dict[str, tuple[int, str]]:
        try:
            return {
                str(h["task_type"]): (int(h["version"]), _shape(h))
                for h in self.session.worker.handler_info()
                if h.get("live")
            }
        except Exception:  # a closed session: nothing to compare
            return {}

    async def _run_async(self, code: Any) -> None:
        # the statement's own coroutine is the task (a wrapper cancelled before its
        # first step would leave it never awaited)
        task: asyncio.Task[Any] = asyncio.ensure_future(eval(code, self.ns))
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)

    def _show_exception(self, brief: bool = False) -> None:
        """The traceback from the statement's first frame on (this module's frames
        and asyncio's are dropped)."""
        et, e, tb = sys.exc_info()
        if (brief or isinstance(e, JSWorkerError)) and e is not None:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return
        while tb is not None and tb.tb_frame.f_code.co_filename != "<repl>":
            if tb.tb_next is None:
                break
            tb = tb.tb_next
        if tb is not None and tb.tb_frame.f_code.co_filename != "<repl>":
            tb = None  # raised before the statement ran (a compile error)
        traceback.print_exception(et, e, tb)


def _paste_bindings() -> KeyBindings:
    """A paste into a line that holds only the auto-indent replaces the indent: pasted
    code brings its own indentation."""
    kb = KeyBindings()

    @kb.add(Keys.BracketedPaste)
    def _paste(event: KeyPressEvent) -> None:
        data = event.data.replace("\r\n", "\n").replace("\r", "\n")
        buf = event.current_buffer
        if not buf.text.strip():
            buf.text = ""
        buf.insert_text(data)

    return kb


def _shape(h: dict[str, Any]) -> str:
    """What a handler's live line adds to its name: partitioned, singleton."""
    if h.get("singleton"):
        return " (singleton)"
    parts = h.get("partitions")
    return f" ({parts} partitions)" if parts else ""


def changes(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]) -> list[str]:
    """``send-email v1 live``, ``send-email v2 live (replaces v1)``, ``send-email
    removed``: what a statement changed among the worker's handlers."""
    out: list[str] = []
    for t, (v, shape) in sorted(after.items()):
        old = before.get(t)
        if old is None:
            out.append(f"{t} v{v} live{shape}")
        elif old[0] != v:
            out.append(f"{t} v{v} live{shape} (replaces v{old[0]})")
    out += [f"{t} removed from this worker" for t in sorted(before) if t not in after]
    return out


def indent_for(lines: list[str]) -> str:
    """The indentation the next line of a block starts with: the last line's, one
    level (4 spaces) deeper after a line ending in ``:``."""
    if not lines:
        return ""
    last = lines[-1]
    indent = last[: len(last) - len(last.lstrip())]
    if last.split("#", 1)[0].rstrip().endswith(":"):
        indent += "    "
    return indent


@contextlib.contextmanager
def _sigint_raises() -> Any:
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rich_print(value: Any) -> None:
    from rich.console import Console

    Console().print(value)


def _displayhook(value: Any) -> None:
    """Expression values: rich renderables (status, trials) as tables, others repr'd."""
    if value is None:
        return
    builtins._ = value  # type: ignore[attr-defined]
    if hasattr(value, "__rich__"):
        _rich_print(value)
    else:
        print(repr(value))


async def run_repl(
    open_session: Callable[[], Awaitable[Session]],
    *,
    history_file: Path | None = None,
    banner: bool = True,
) -> None:
    """Open the session, run the REPL until Ctrl-D, close the session cleanly."""
    from .._version import __version__

    session = await open_session()
    try:
        path = history_file or default_history()
        history: History
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        repl = Repl(session, history=history)
        if banner:
            print(
                BANNER.format(
                    version=__version__,
                    worker=session.worker.worker_id,
                    engine=session.worker.engine,
                    url=session.url,
                    group=f" (group {session.group})" if session.group else "",
                    embedded=(
                        "\n  the server is embedded: this REPL started it (export "
                        f"NATS_URL={session.url} to reach it); it stops when you leave"
                        if session.server is not None
                        else ""
                    ),
                ),
                flush=True,
            )
        old_hook = sys.displayhook
        sys.displayhook = _displayhook
        try:
            await repl.run()
        finally:
            sys.displayhook = old_hook
    finally:
        print("leaving: stopping the worker (in-flight tasks finish, partitions handed back)")
        await session.close()
        print("bye", flush=True)
