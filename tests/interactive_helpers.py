"""Driving a real Jupyter kernel (jupyter_client) from a test, and waiting on state."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from servers import provisioned_server

from jsworker import EmbeddedServer


@dataclass
class CellResult:
    stdout: str = ""
    stderr: str = ""
    data: list[dict[str, Any]] = field(default_factory=list)  # execute_result / display_data
    updates: list[dict[str, Any]] = field(default_factory=list)  # update_display_data
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "\n".join(str(d.get("text/plain", "")) for d in self.data)

    @property
    def html(self) -> str:
        return "\n".join(str(d.get("text/html", "")) for d in self.data)


class Kernel:
    """A real ipykernel in a subprocess; :meth:`run` executes one cell and collects its
    outputs (by parent message id) until the kernel is idle again."""

    def __init__(self, env: dict[str, str], kernel_name: str = "python3", **km: Any) -> None:
        self.km = AsyncKernelManager(kernel_name=kernel_name, **km)
        self.env = env
        self.kc: Any = None
        self.stray: list[dict[str, Any]] = []

    async def start(self) -> Kernel:
        await self.km.start_kernel(env=self.env)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)
        return self

    async def run(self, code: str, timeout: float = 60) -> CellResult:
        msg_id = self.kc.execute(code)
        res = CellResult()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"cell did not finish in {timeout}s: {code[:200]}")
            msg = await self.kc.get_iopub_msg(timeout=left)
            if msg["parent_header"].get("msg_id") != msg_id:
                self.stray.append(msg)
                continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                if c["name"] == "stdout":
                    res.stdout += c["text"]
                else:
                    res.stderr += c["text"]
            elif t in ("execute_result", "display_data"):
                res.data.append(c["data"])
            elif t == "update_display_data":
                res.updates.append(c["data"])
            elif t == "error":
                res.error = c
            elif t == "status" and c["execution_state"] == "idle":
                return res

    async def ok(self, code: str, timeout: float = 60) -> CellResult:
        res = await self.run(code, timeout)
        if res.error is not None:
            tb = "\n".join(res.error.get("traceback", []))
            raise AssertionError(f"cell failed: {res.error['ename']}: {res.error['evalue']}\n{tb}")
        return res

    async def stop(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        await self.km.shutdown_kernel(now=False)


async def wait_for(pred: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll ``pred`` (a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


SERVE = [
    sys.executable,
    "-m",
    "jsworker.cli",
    "serve",
    "interactive_app:make_worker",
    "--app-dir",
    str(Path(__file__).resolve().parent),
]


async def spawn_serve(env: dict[str, str]) -> asyncio.subprocess.Process:
    """``jsworker serve interactive_app:make_worker`` (tests/interactive_app.py)."""
    return await asyncio.create_subprocess_exec(
        *SERVE, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


def own_server() -> Iterator[EmbeddedServer]:
    """A provisioned server for one test module. The interactive tests override the
    session-wide ``server`` fixture with it, so the many task types they create do not
    crowd the shared server (``jsworker top`` lists every type it has seen)."""
    yield from provisioned_server()
