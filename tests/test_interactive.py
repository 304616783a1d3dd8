"""Interactive mode, fast parts: the magic-line rewriting, the per-cell hook, displays
helpers, the kernel spec, and that ``import jsworker`` stays free of IPython."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from jsworker.cli import cli
from jsworker.interactive import _magics as m
from jsworker.interactive._display import _ranges
from jsworker.interactive._kernel import kernel_spec
from jsworker.interactive._session import dev_group


def test_import_jsworker_does_not_import_ipython() -> None:
    code = (
        "import sys, jsworker, jsworker.interactive, jsworker.cli; print('IPython' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("%jsworker status\n", "await {ref}.run_magic('status')\n"),
        ("s = %jsworker connect --dev\n", "s = await {ref}.run_magic('connect --dev')\n"),
        (
            "  %jsworker submit t '{\"a\": 1}'",
            "  await {ref}.run_magic('submit t \\'{{\"a\": 1}}\\'')\n",
        ),
        ("%jsworkers status\n", "%jsworkers status\n"),
        ("x = 1  # %jsworker status\n", "x = 1  # %jsworker status\n"),
    ],
)
def test_magic_lines_become_awaits(line: str, want: str) -> None:
    assert m._rewrite_magic_lines([line]) == [want.format(ref=m._REF)]


def _cell(source: str) -> ast.Module:
    m.state.shell = object()  # any shell: the hook only checks that one is installed
    try:
        lines = m._append_after_cell(source.splitlines(keepends=True))
    finally:
        m.state.shell = None
    return m._FoldLast().visit(ast.parse("".join(lines)))


def test_after_cell_keeps_the_cells_value() -> None:
    tree = _cell("x = 2\nx * 21")
    last = tree.body[-1]
    assert isinstance(last, ast.Expr) and isinstance(last.value, ast.Await)
    call = last.value.value
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
    assert call.func.attr == "after_cell"
    assert ast.unparse(call.args[0]) == "x * 21"
    assert len(tree.body) == 2


def test_after_cell_appended_to_statements_and_not_to_cell_magics() -> None:
    tree = _cell("def f():\n    return 1\n")
    assert ast.unparse(tree.body[-1]).endswith(".after_cell()")
    m.state.shell = object()
    try:
        magic = ["get_ipython().run_cell_magic('time', '', 'x = 1\\n')\n"]
        assert m._append_after_cell(magic) == magic
        assert m._append_after_cell(["\n"]) == ["\n"]
    finally:
        m.state.shell = None


async def test_run_magic_errors_are_one_line() -> None:
    m.state.session = None
    with pytest.raises(m.ConfigError, match="run `%jsworker connect"):
        await m.run_magic("status")
    with pytest.raises(m.ConfigError, match="unknown command 'frobnicate'"):
        await m.run_magic("frobnicate")
    with pytest.raises(m.ConfigError, match="cannot parse"):
        await m.run_magic("submit t '{")
    assert "%jsworker connect" in await m.run_magic("help")


def test_ranges_and_dev_group() -> None:
    assert _ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges([]) == ""
    assert dev_group("Alice Smith") == "dev-Alice-Smith"
    assert dev_group("a.b@c") == "dev-a-b-c"


def test_kernel_install(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli,
        [
            "kernel",
            "install",
            "--url",
            "nats://127.0.0.1:4999",
            "--name",
            "jsw-test",
            "--group",
            "dev-x",
            "--prefix",
            str(tmp_path),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    spec = json.loads((Path(info["path"]) / "kernel.json").read_text())
    assert spec == kernel_spec("nats://127.0.0.1:4999", "dev-x", "jsw-test")
    assert spec["env"] == {m.URL_ENV: "nats://127.0.0.1:4999", m.GROUP_ENV: "dev-x"}
    assert "--ext=jsworker" in spec["argv"]
    assert Path(info["path"]).is_relative_to(tmp_path)


def test_kernel_install_bad_name(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["kernel", "install", "--name", "no/slash", "--prefix", str(tmp_path)]
    )
    assert res.exit_code == 1
    assert "kernel name 'no/slash'" in res.output
    assert "Traceback" not in res.output
