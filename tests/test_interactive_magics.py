"""``%load_ext jsworker`` leaves IPython's own magics alone: in a real ipykernel, with and
without a session connected, every standard cell and line magic that is sane to run in
a kernel gives its normal result and no error. (The extension once appended an
``await`` to every cell's text, which broke ``%%time``, ``%%timeit``, ``%timeit``,
``%%capture`` and what ``%history`` shows.)"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from interactive_helpers import CellResult, Kernel, own_server

from jsworker import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent

server = pytest.fixture(scope="module", name="server")(own_server)


def kernel_env(server: EmbeddedServer) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["NATS_URL"] = server.url
    env.pop("JSWORKER_KERNEL_URL", None)
    return env


@pytest.fixture
async def kernel(server: EmbeddedServer) -> AsyncIterator[Kernel]:
    k = await Kernel(kernel_env(server)).start()
    try:
        yield k
    finally:
        await k.stop()


@dataclass
class Case:
    cell: str
    check: Callable[[CellResult], object]


def _no_jsworker_code(res: CellResult) -> None:
    everything = res.stdout + res.stderr + res.text + res.html
    assert "after_cell" not in everything and "jsworker.interactive._magics" not in everything


def cases(tmp: Path) -> list[Case]:
    out = tmp / "written.txt"
    script = tmp / "script.py"
    script.write_text("ran_by_run = 6 * 7\nprint('script ran')\n")
    have_bash = shutil.which("bash") is not None
    c = [
        Case("x = 21", lambda r: r.stdout == "" and not r.data),
        # the line before is what %history shows: the cell as typed, nothing added
        Case("%history -l 1", lambda r: r.stdout.strip() == "x = 21"),
        Case("_i", lambda r: r.text == "'%history -l 1'"),
        Case("%%time\ny = x * 2\ny", lambda r: "Wall time" in r.stdout and r.text == "42"),
        Case("%time z = x + 1", lambda r: "Wall time" in r.stdout),
        Case("z", lambda r: r.text == "22"),
        Case("%time x * 2", lambda r: "Wall time" in r.stdout and r.text == "42"),
        Case("%%timeit -n1 -r1\nsum(range(10))", lambda r: "per loop" in r.stdout),
        Case("%timeit -n1 -r1 sum(range(10))", lambda r: "per loop" in r.stdout),
        Case("t = %timeit -o -q -n1 -r1 x + 1\nt.loops", lambda r: r.text == "1"),
        Case("%%capture cap\nprint('captured')\nx", lambda r: r.stdout == "" and not r.data),
        Case("cap.stdout", lambda r: r.text == "'captured\\n'"),
        Case(
            "%%capture\nprint('swallowed')",
            lambda r: r.stdout == "" and not r.data,
        ),
        Case(f"%%writefile {out}\nline one\n", lambda r: f"Writing {out}" in r.stdout),
        Case(f"open({str(out)!r}).read()", lambda r: r.text == "'line one\\n'"),
        Case(f"%%writefile -a {out}\nline two\n", lambda r: f"Appending to {out}" in r.stdout),
        Case(f"%%file {tmp / 'f.txt'}\nf\n", lambda r: "Writing" in r.stdout),
        Case("%who int", lambda r: "x" in r.stdout.split() and "z" in r.stdout.split()),
        Case("%who_ls int", lambda r: "'x'" in r.text),
        Case("%whos int", lambda r: "Variable" in r.stdout and "21" in r.stdout),
        Case("%env JSWORKER_TEST_VAR=hello", lambda r: "env: JSWORKER_TEST_VAR=hello" in r.stdout),
        Case("%env JSWORKER_TEST_VAR", lambda r: r.text == "'hello'"),
        Case("%set_env JSWORKER_TEST_VAR2 bye", lambda r: "JSWORKER_TEST_VAR2=bye" in r.stdout),
        Case("import os; os.environ['JSWORKER_TEST_VAR2']", lambda r: r.text == "'bye'"),
        Case("%pwd", lambda r: r.text.startswith("'/")),
        Case("%%html\n<b>bold</b>", lambda r: "<b>bold</b>" in r.html),
        Case("%%HTML\n<i>it</i>", lambda r: "<i>it</i>" in r.html),
        Case(
            "%%svg\n<svg xmlns='http://www.w3.org/2000/svg'></svg>",
            lambda r: any("image/svg+xml" in d for d in r.data),
        ),
        Case(
            "%%javascript\nconsole.log(1)",
            lambda r: any("console.log(1)" in d.get("application/javascript", "") for d in r.data),
        ),
        Case(
            "%%js\nconsole.log(2)",
            lambda r: any("console.log(2)" in d.get("application/javascript", "") for d in r.data),
        ),
        Case(
            "%%markdown\n# title",
            lambda r: any("# title" in d.get("text/markdown", "") for d in r.data),
        ),
        Case(
            "%%latex\n$x^2$",
            lambda r: any("$x^2$" in d.get("text/latex", "") for d in r.data),
        ),
        Case("%precision 3", lambda r: r.text == "'%.3f'"),
        Case("3.14159", lambda r: r.text == "3.142"),
        Case("%precision", lambda r: r.text == "'%r'"),
        Case("%xmode Plain", lambda r: "Exception reporting mode: Plain" in r.stdout),
        Case("%xmode Context", lambda r: "Exception reporting mode: Context" in r.stdout),
        Case("%lsmagic", lambda r: "%%timeit" in r.text),
        Case("%autoawait", lambda r: "IPython autoawait is `on`" in r.stdout),
        Case("%config InteractiveShell.ast_node_interactivity = 'last_expr'", lambda r: not r.data),
        Case("%config HistoryManager", lambda r: "HistoryManager" in r.stdout),
        Case(f"%run {script}", lambda r: "script ran" in r.stdout),
        Case("ran_by_run", lambda r: r.text == "42"),
        Case("%prun -q sum(range(100))", lambda r: r.error is None),
        Case("%%prun -q\nsum(range(100))", lambda r: r.error is None),
        Case("%alias_magic tt time", lambda r: "Created `%tt` as an alias for `%time`" in r.stdout),
        Case("%tt 1 + 1", lambda r: "Wall time" in r.stdout and r.text == "2"),
        Case("%pdef sorted", lambda r: r.error is None),
        Case("%reset_selective -f ^ran_by_run$", lambda r: r.error is None),
        Case("'ran_by_run' in dir()", lambda r: r.text == "False"),
        Case("%xdel z", lambda r: r.error is None),
        Case("%%python3\nprint('in a subprocess')", lambda r: "in a subprocess" in r.stdout),
        Case("!echo bang", lambda r: "bang" in r.stdout),
        Case("lines = !echo captured bang\nlines.n", lambda r: r.text == "'captured bang'"),
        Case("%sx echo sx", lambda r: "'sx'" in r.text),
        Case("%%sx\necho cellsx", lambda r: "'cellsx'" in r.text),
        Case("%system echo system", lambda r: "'system'" in r.text),
        Case("async def f():\n    return 5\nawait f()", lambda r: r.text == "5"),
        Case("1 + 1;", lambda r: not r.data),
        Case("%history -n -l 2", lambda r: "await f()" in r.stdout and "1 + 1;" in r.stdout),
    ]
    if have_bash:
        c += [
            Case("%%bash\necho from bash $((6 * 7))", lambda r: "from bash 42" in r.stdout),
            Case("%%sh\necho from sh", lambda r: "from sh" in r.stdout),
            Case("%%script bash\necho from script", lambda r: "from script" in r.stdout),
            Case(
                "%%bash --out bash_out\necho kept",
                lambda r: r.stdout == "",
            ),
            Case("bash_out", lambda r: r.text == "'kept\\n'"),
        ]
    return c


async def _run_all(kernel: Kernel, tmp: Path) -> None:
    failures: list[str] = []
    for case in cases(tmp):
        res = await kernel.run(case.cell)
        why = ""
        if res.error is not None:
            why = f"{res.error['ename']}: {res.error['evalue']}"
        else:
            try:
                if not case.check(res):
                    why = "unexpected result"
                _no_jsworker_code(res)
            except AssertionError as e:
                why = f"unexpected result {e}"
        if why:
            failures.append(
                f"{case.cell!r}: {why}\n  stdout={res.stdout!r}\n  stderr={res.stderr[-300:]!r}"
                f"\n  data={res.data!r}"
            )
    assert not failures, "\n".join(failures)


async def test_the_cases_hold_in_a_plain_kernel(kernel: Kernel, tmp_path: Path) -> None:
    """The expectations are IPython's own: they hold without the extension."""
    await _run_all(kernel, tmp_path)


async def test_ipython_magics_without_a_session(kernel: Kernel, tmp_path: Path) -> None:
    await kernel.ok("%load_ext jsworker")
    await _run_all(kernel, tmp_path)


async def test_ipython_magics_with_a_session(
    kernel: Kernel, server: EmbeddedServer, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    await kernel.ok("%load_ext jsworker")
    await kernel.ok(f"%jsworker connect {server.url}")
    await _run_all(kernel, tmp_path)
    # a handler registered under a cell magic is still confirmed after the cell
    t = unique("magic")
    res = await kernel.ok(f"%%time\nsession.handle({t!r}, lambda ctx: 'timed')")
    assert "Wall time" in res.stdout
    res = await kernel.ok(f"await session.submit({t!r}, wait=True)")
    assert res.text == "'timed'"
    t2 = unique("capmagic")
    await kernel.ok(f"%%capture\nsession.handle({t2!r}, lambda ctx: 'captured')")
    res = await kernel.ok(f"await session.submit({t2!r}, wait=True)")
    assert res.text == "'captured'"
    await kernel.ok("%jsworker close")


async def test_magics_work_after_reload_and_unload(kernel: Kernel) -> None:
    """%reload_ext and %unload_ext leave a working shell too."""
    await kernel.ok("%load_ext jsworker")
    await kernel.ok("%reload_ext jsworker")
    res = await kernel.ok("%%time\nv = 1")
    assert "Wall time" in res.stdout
    res = await kernel.ok("%timeit -n1 -r1 v + 1")
    assert "per loop" in res.stdout
    await kernel.ok("%unload_ext jsworker")
    await kernel.ok("%%capture c\nprint('x')")
    res = await kernel.ok("c.stdout")
    assert res.text == "'x\\n'"


_TERMINAL = """
import sys
from IPython.core.interactiveshell import InteractiveShell

ip = InteractiveShell.instance(history_length=0)
ip.history_manager.enabled = False
url, clash, ok = sys.argv[1:4]

def cell(code):
    r = ip.run_cell(code)
    return r

assert cell("%load_ext jsworker").success
assert cell(f"%jsworker connect {url} --group dev-terminal").success
r = cell(f"session.handle({clash!r}, lambda ctx: 1)\\nprint('defined')")
print("clash:", r.success, type(r.error_in_exec).__name__)
r = cell("%%time\\nx = 1")
print("time:", r.success, r.error_in_exec)
r = cell(f"session.handle({ok!r}, lambda ctx: 'terminal')")
print("ok:", r.success)
r = cell(f"out = await session.submit({ok!r}, wait=True)")
print("out:", ip.user_ns.get("out"))
assert cell("%jsworker close").success
"""


async def test_terminal_ipython_checks_after_the_cell(
    server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    """Without a kernel (terminal IPython) the check after a cell is IPython's
    ``post_run_cell`` event: a refused consumer fails the cell that defined it."""
    import asyncio
    import sys

    import nats

    import jsworker

    clash, ok = unique("tclash"), unique("tok")
    nc = await nats.connect(server.url)
    other = jsworker.Worker(nc)  # no groups: owns task.clash.>, a grouped consumer overlaps
    other.handle(clash, lambda ctx: None)
    await other.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _TERMINAL,
            server.url,
            clash,
            ok,
            env=kernel_env(server),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await other.stop()
        await nc.close()
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, out + err
    assert "defined" in out
    assert "clash: False ConsumerConflictError" in out, out + err
    assert "ConsumerConflictError" in out and "overlaps" in out
    assert "Traceback" not in out and "Error in callback" not in out  # one line
    assert "time: True None" in out and "Wall time" in out
    assert "ok: True" in out and "out: terminal" in out, out + err
