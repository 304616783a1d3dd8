"""Choosing the event loop, with uvicorn's semantics for ``--loop``.

* ``auto``: uvloop when it is installed (``pip install 'jsworker[fast]'``), else asyncio;
* ``asyncio``: the standard library's loop;
* ``uvloop``: uvloop, and a clear error when it is not installed.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

from ._errors import ConfigError

LOOPS = ("auto", "asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def resolve_loop(name: str) -> tuple[str, LoopFactory | None]:
    """``(the loop that will run, its factory)``; the factory is ``None`` for asyncio
    (``asyncio.Runner``'s default). Raises :class:`ConfigError` for an unknown name or
    ``uvloop`` when it is not installed."""
    if name not in LOOPS:
        raise ConfigError(f"unknown event loop {name!r}: choose one of {', '.join(LOOPS)}")
    if name == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if name == "uvloop":
            raise ConfigError(
                "--loop uvloop: uvloop is not installed (pip install 'jsworker[fast]')"
            ) from None
        return "asyncio", None
    factory: LoopFactory = uvloop.new_event_loop
    return "uvloop", factory
