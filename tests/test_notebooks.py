"""The notebooks in notebooks/ run top to bottom in a real kernel (nbclient) against
real servers; a cell error fails the test. Their committed outputs come from such a
run (``python tests/test_notebooks.py --write``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_path) if p)
    try:
        NotebookClient(
            nb,
            kernel_name="python3",
            timeout=180,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    return nb


def outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.extend(str(v) for v in o.get("data", {}).values())
    return "\n".join(parts)


@pytest.mark.timeout(300)
def test_quickstart() -> None:
    nb = execute(NOTEBOOKS / "quickstart.ipynb")
    text = outputs(nb)
    assert "'hello ada'" in text
    assert "'Hello, Grace Hopper!'" in text
    assert "step.completed  greet" in text
    assert "TaskFailed task failed (non_retriable): division by zero" in text
    assert "<table>" in text  # the status display


@pytest.mark.timeout(300)
def test_live_partitions() -> None:
    nb = execute(NOTEBOOKS / "live-partitions.ipynb")
    text = outputs(nb)
    assert "partition map resize: 2 members" in text  # before joining, and after leaving
    assert "3 members" in text
    assert "notebook v1" in text and "notebook v2" in text
    assert "(this session)" in text


if __name__ == "__main__" and "--write" in sys.argv:
    for name in ("quickstart.ipynb", "live-partitions.ipynb"):
        nbformat.write(execute(NOTEBOOKS / name), NOTEBOOKS / name)
        print("wrote", name)
