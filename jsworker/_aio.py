"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it is gone (``None`` is fine). Errors it
    ends with are not re-raised: it is being stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task has been asked to cancel.

    Python 3.11's ``asyncio.wait_for``, which nats-py uses in ``Subscription.next_msg``
    and in a KV watcher's ``updates``, can swallow a cancel that lands just as its result
    arrives: the await returns the message and the cancel is lost. A loop that reads a
    busy subject then runs on after Ctrl-C. Called after such an await, this honours the
    cancel that was asked for."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
