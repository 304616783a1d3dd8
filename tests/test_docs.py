"""Every ```python block in docs/*.md runs, against the session's real server.

Convention (stated in docs/index.md): a block is the body of ``async def main(nc)``,
where ``nc`` is a connected ``nats.aio.client.Client`` on a server provisioned with
``jsworker.setup_all``. ``jsworker``, ``asyncio`` and ``nats`` are importable as usual
(blocks import what they use). A block whose first line is ``# not-run`` is shown only
(a sketch, or a page whose feature is not implemented yet).

Blocks use plain, readable task type names ("send-email"), so each block must leave no
trace another block could trip over: after it runs, the consumers, streams and
elastic-group entries it created are deleted and the task subjects of those consumers
purged. Each run block must contain an ``assert`` (so it checks what it shows).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = "# not-run"
NOT_IMPLEMENTED = "Status: not implemented yet"
BLOCK_TIMEOUT = 60.0
PCG_BUCKET = "elastic-consumer-groups"


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the first code line in the .md file
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runs(self) -> bool:
        return not self.code.lstrip().startswith(NOT_RUN)


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page.name, text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in FENCE.finditer(text)
    ]


PAGES = sorted(DOCS.glob("*.md"))
ALL = [b for p in PAGES for b in blocks(p)]
RUN = [b for b in ALL if b.runs]


def compile_block(b: Block) -> Any:
    """Compile ``b`` as the body of ``async def main(nc)`` with the .md file's line
    numbers, so a failure points at the line in the docs."""
    body = textwrap.indent(b.code, "    ")
    src = "\n" * (b.line - 2) + "async def main(nc):\n" + body
    return compile(src, str(DOCS / b.page), "exec")


# ----------------------------------------------------------------- isolation helpers
async def _snapshot(nc: NATS) -> tuple[set[str], set[str], set[str]]:
    js = nc.jetstream()
    consumers = {c.name for c in await js.consumers_info("TASK_QUEUES")}
    streams = {s.config.name for s in await js.streams_info()}
    kv = await js.key_value(PCG_BUCKET)
    try:
        keys = set(await kv.keys())
    except nats.js.errors.NoKeysError:
        keys = set()
    return consumers, streams, keys


async def _cleanup(nc: NATS, before: tuple[set[str], set[str], set[str]]) -> None:
    js = nc.jetstream()
    consumers, streams, keys = before
    for c in await js.consumers_info("TASK_QUEUES"):
        if c.name in consumers:
            continue
        filt = c.config.filter_subject
        with contextlib.suppress(Exception):
            await js.delete_consumer("TASK_QUEUES", c.name)
        if filt:
            with contextlib.suppress(Exception):
                await js.purge_stream("TASK_QUEUES", subject=filt)
    for s in await js.streams_info():
        if s.config.name not in streams:
            with contextlib.suppress(Exception):
                await js.delete_stream(s.config.name)
    kv = await js.key_value(PCG_BUCKET)
    with contextlib.suppress(nats.js.errors.NoKeysError):
        for k in set(await kv.keys()) - keys:
            with contextlib.suppress(Exception):
                await kv.purge(k)


# ------------------------------------------------------------------------ the tests
def test_docs_exist() -> None:
    names = {p.name for p in PAGES}
    for want in (
        "index.md",
        "worker-configuration.md",
        "task-outcomes.md",
        "heartbeats.md",
        "signals-and-checkpoints.md",
        "embedded-workers.md",
        "provisioning.md",
        "partitions.md",
        "sticky-assignment.md",
        "rate-limiting.md",
        "interactive-mode.md",
    ):
        assert want in names, f"docs/{want} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs_something_unless_not_implemented(page: Path) -> None:
    text = page.read_text()
    not_implemented = NOT_IMPLEMENTED in "\n".join(text.splitlines()[:8])
    runnable = [b for b in blocks(page) if b.runs]
    if not_implemented:
        assert not runnable, f"{page.name} is 'not implemented yet' but has runnable blocks"
    elif page.name not in ("index.md", "cli.md", "performance.md"):
        assert runnable, f"{page.name} documents working features but has no runnable example"


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_block_checks_something(block: Block) -> None:
    tree = ast.parse("async def main(nc):\n" + textwrap.indent(block.code, "    "))
    assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), (
        f"{block.id}: a runnable example must assert what it shows"
    )


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
async def test_block_runs(block: Block, nc: NATS) -> None:
    code = compile_block(block)
    ns: dict[str, Any] = {"__name__": f"docs_{block.page}"}
    exec(code, ns)
    before = await _snapshot(nc)
    try:
        await asyncio.wait_for(ns["main"](nc), BLOCK_TIMEOUT)
    finally:
        await _cleanup(nc, before)
