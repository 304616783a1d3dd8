"""``jsworker serve``'s refusals and engine choice that need no DagNats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jsworker import EmbeddedServer

EMPTY = """
import jsworker

def make_worker(nc):
    return jsworker.Worker(nc)
"""


def serve(url: str, app_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jsworker.cli",
            "--url",
            url,
            "serve",
            "app:make_worker",
            "--app-dir",
            str(app_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_an_app_with_no_handlers(server: EmbeddedServer, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(EMPTY)
    res = serve(server.url, tmp_path)
    assert res.returncode == 1
    assert "app:make_worker has no handlers: nothing to serve" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_serve_refuses_an_unknown_engine(server: EmbeddedServer, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(EMPTY)
    res = serve(server.url, tmp_path, "--engine", "celery")
    assert res.returncode == 2
    assert "'celery' is not one of 'standalone', 'dagnats', 'auto'" in res.stderr


@pytest.mark.parametrize("value", ["DagNats", " standalone "])
def test_the_engine_setting_is_case_and_space_tolerant(value: str) -> None:
    from jsworker._dagnats import engine_setting

    assert engine_setting(value) == value.strip().lower()


def test_a_bad_jsworker_engine_variable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import jsworker
    from jsworker._dagnats import engine_setting

    monkeypatch.setenv("JSWORKER_ENGINE", "temporal")
    with pytest.raises(jsworker.ConfigError, match="JSWORKER_ENGINE must be one of"):
        engine_setting(None)
