"""Interactive mode: a live worker in a notebook or a REPL.

``session = await jsworker.interactive.connect(url)`` (``None``: an embedded server)
opens a :class:`Session`; ``@session.handle("type")`` registers a handler on the
running worker, defining it again replaces its code, ``await session.remove("type")``
withdraws it. In Jupyter, ``%load_ext jsworker`` brings the ``%jsworker`` magics; in a
terminal, ``jsworker repl``. See docs/interactive-mode.md.

Importing this package does not import IPython.
"""

from ._dead_loop import Trial, TrialRow, try_dead
from ._display import GroupMap, LiveView, Snapshot, live
from ._session import RecentOutcome, Session, connect, dev_group

__all__ = [
    "GroupMap",
    "LiveView",
    "RecentOutcome",
    "Session",
    "Snapshot",
    "Trial",
    "TrialRow",
    "connect",
    "dev_group",
    "live",
    "try_dead",
]
