"""Interactive mode, fast parts: the magic-line rewriting, the per-cell hooks, displays
helpers, the kernel spec, and that ``import jsworker`` stays free of IPython."""

from __future__ import annotations

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


_INSTALL_CHECK = """
from IPython.core.interactiveshell import InteractiveShell
from jsworker.interactive import _magics as m

ip = InteractiveShell(history_length=0)
ip.history_manager.enabled = False
cells = ("x = 1\\n", "%%time\\nx = 1\\n", "%timeit -n1 x\\n", "1 + 1;\\n")
plain = [ip.transform_cell(c) for c in cells]
before = (list(ip.input_transformers_cleanup), list(ip.input_transformers_post))
m.install(ip)
assert ip.input_transformers_cleanup == [*before[0], m._rewrite_magic_lines]
assert ip.input_transformers_post == before[1]
assert ip.ast_transformers == []
assert m._post_run_cell in ip.events.callbacks["post_run_cell"]
assert [ip.transform_cell(c) for c in cells] == plain
m.unload_ipython_extension(ip)
assert m._post_run_cell not in ip.events.callbacks["post_run_cell"]
assert ip.input_transformers_cleanup == before[0]
print("ok")
"""


def test_install_changes_no_cell_text_but_magic_lines() -> None:
    """The per-cell check is an event hook, not text added to cells: the only input
    transformer is the `%jsworker` line rewriting, and there is no AST transformer.
    (In a subprocess: an IPython shell changes process-wide state.)"""
    out = subprocess.run(
        [sys.executable, "-c", _INSTALL_CHECK], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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
