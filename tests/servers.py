"""Servers for tests: one place that starts a real ``nats-server`` and provisions it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import nats

import jsworker
from jsworker import EmbeddedServer


def provisioned_server(**options: Any) -> Iterator[EmbeddedServer]:
    """Start an embedded server (``options`` go to ``EmbeddedServer``), provision it
    with ``setup_all``, yield it, stop it. Used by the session-wide ``server`` fixture
    and by modules that want a server of their own (to keep their task types and
    entries off the shared one, whose listings other tests read)."""
    srv = EmbeddedServer(**options).start_sync()

    async def provision() -> None:
        nc = await nats.connect(srv.url)
        try:
            await jsworker.setup_all(nc)
        finally:
            await nc.close()

    try:
        asyncio.run(provision())
        yield srv
    finally:
        srv.stop_sync()
