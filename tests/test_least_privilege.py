"""The least-privilege roles of docs/security.md, against a server started with the
exact ``authorization`` block on that page: each role does its job, and the worker of
one task type cannot read another type's tasks (nor read signals directly)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

import jsworker
from jsworker import EmbeddedServer

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
TYPE, OTHER = "resize-image", "send-email"


def roles_config() -> str:
    """The ```conf block of the page's "Least privilege" section."""
    section = DOC.read_text().split("## Least privilege", 1)[1]
    m = re.search(r"^```conf\n(.*?)^```", section, re.S | re.M)
    assert m, "docs/security.md has no ```conf block under 'Least privilege'"
    return m.group(1)


def cli(user: str, password: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", "--url", url, "--user", user,
         "--password", password, *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )  # fmt: skip


async def acli(user: str, password: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, user, password, url, *args)


class Denials:
    """Collects the server's "permissions violation" errors (nats-py's ``error_cb``)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.event = asyncio.Event()

    async def cb(self, e: Exception) -> None:
        if "permissions violation" in str(e).lower():
            self.seen.append(str(e).lower())
            self.event.set()

    async def expect(self, subject: str) -> None:
        """Wait (bounded) until a violation naming ``subject`` was reported."""
        async with asyncio.timeout(10):
            while not any(subject.lower() in s for s in self.seen):
                self.event.clear()
                await self.event.wait()


@pytest.fixture
async def srv() -> AsyncIterator[EmbeddedServer]:
    # the page's block plus an admin user, for setting the scene (another type's task)
    conf = roles_config().replace(
        "  users: [\n", "  users: [\n    { user: admin, password: admin-pw }\n", 1
    )
    async with EmbeddedServer(extra_config=conf) as s:
        yield s


async def test_each_role_does_its_job_and_the_worker_stays_in_its_lane(
    srv: EmbeddedServer,
) -> None:
    url = srv.url
    p = await acli("provisioner", "provisioner-pw", url, "kv", "setup", "--json")
    assert p.returncode == 0, p.stderr
    assert {r["status"] for r in json.loads(p.stdout)} == {"created"}
    p = await acli("provisioner", "provisioner-pw", url, "task", "submit", TYPE, "{}")
    assert p.returncode == 1 and "permissions violation" in p.stderr, p.stderr  # not its job

    admin = await nats.connect(url, user="admin", password="admin-pw")
    denials = Denials()
    wnc = await nats.connect(url, user="worker-resize", password="worker-pw", error_cb=denials.cb)
    try:
        # another type's task waits in its own consumer
        js = admin.jetstream()
        await js.add_consumer(
            "TASK_QUEUES",
            durable_name=OTHER,
            name=OTHER,
            filter_subject=f"task.{OTHER}.>",
            ack_policy="explicit",
        )
        other = await jsworker.Client(admin).submit(OTHER, {"secret": "other type's input"})
        await jsworker.Client(admin).send_signal(other.run_id, "approve", {"by": "alice"})

        worker = jsworker.Worker(wnc)

        @worker.handle(TYPE)
        async def resize(ctx: jsworker.TaskContext) -> object:
            await ctx.stream({"progress": 50})
            if ctx.json() == "broken":
                ctx.fail_permanent("cannot resize")
            return {"resized": ctx.json()}

        async with worker:
            # the submitter, through the library and the CLI
            snc = await nats.connect(url, user="submitter", password="submitter-pw")
            try:
                h = await jsworker.Client(snc).submit(TYPE, {"w": 640})
                assert await h.result(timeout=20) == {"resized": {"w": 640}}
            finally:
                await snc.close()
            p = await acli("submitter", "submitter-pw", url, "task", "submit", TYPE, '"broken"',
                           "--wait")  # fmt: skip
            assert p.returncode == 1 and "cannot resize" in p.stderr, p.stderr  # dead-lettered
            p = await acli("submitter", "submitter-pw", url, "task", "cancel", h.run_id)
            assert p.returncode == 0, p.stderr

            # the reader's commands
            for args in (
                ["workers", "--json"],
                ["workers", "watch", "--timeout", "1"],
                ["task", "events", h.run_id],
                ["task", "watch", h.run_id, "--timeout", "1"],
                ["signal", "list", other.run_id],
                ["partitions", "list"],
                ["kv", "setup", "--check"],
            ):
                p = await acli("reader", "reader-pw", url, *args)
                assert "permissions violation" not in p.stderr, (args, p.stderr)
                assert p.returncode in (0, 1) and "Traceback" not in p.stderr, (args, p.stderr)
            p = await acli("reader", "reader-pw", url, "workers", "--json")
            assert worker.worker_id in {e["worker_id"] for e in json.loads(p.stdout)}
            p = await acli("reader", "reader-pw", url, "task", "submit", TYPE, "{}")
            assert p.returncode == 1 and "permissions violation" in p.stderr, p.stderr
            p = await acli("reader", "reader-pw", url, "signal", "send", h.run_id, "x", "1")
            assert p.returncode == 1 and "permissions violation" in p.stderr, p.stderr

            # the worker cannot reach the other type's tasks, by any JetStream path
            tries = [
                f"$JS.API.CONSUMER.INFO.TASK_QUEUES.{OTHER}",
                f"$JS.API.CONSUMER.CREATE.TASK_QUEUES.{OTHER}.task.{OTHER}.>",
                f"$JS.API.CONSUMER.CREATE.TASK_QUEUES.sneaky.task.{OTHER}.>",
                "$JS.API.CONSUMER.CREATE.TASK_QUEUES",
                f"$JS.API.CONSUMER.DURABLE.CREATE.TASK_QUEUES.{OTHER}",
                f"$JS.API.CONSUMER.MSG.NEXT.TASK_QUEUES.{OTHER}",
                "$JS.API.STREAM.MSG.GET.TASK_QUEUES",
                f"$JS.API.DIRECT.GET.TASK_QUEUES.task.{OTHER}.{other.run_id}",
                # nor read signals directly
                f"$JS.API.DIRECT.GET.KV_signals.$KV.signals.{other.run_id}.approve",
                "$JS.API.STREAM.MSG.GET.KV_signals",
            ]
            for subject in tries:
                with pytest.raises(nats.errors.TimeoutError):
                    await wnc.request(subject, b"{}", timeout=1)
                await denials.expect(subject)
            await wnc.subscribe(f"task.{OTHER}.>")  # a core subscription on its subjects
            await denials.expect(f'subscription to "task.{OTHER}.>"')
        # the other type's task is still there, untouched
        info = await js.consumer_info("TASK_QUEUES", OTHER)
        assert info.num_pending == 1 and info.delivered.stream_seq == 0
    finally:
        await wnc.close()
        await admin.close()
