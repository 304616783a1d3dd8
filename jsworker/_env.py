"""What a handler runtime is given by its worker: a small, explicit environment.

Runtimes (plain and partitioned) never reach back into :class:`~jsworker.Worker`; a
task flows one way, pull -> executor -> outcome -> wire. Everything a runtime may use is
listed here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ._pull import Slots
from ._stats import WorkerHealth
from ._supervisor import Supervisor
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from ._dagnats import Contract
    from ._handler import HandlerRuntime
    from ._sticky import StickySettings


class Executes(Protocol):
    """The executor as runtimes see it."""

    async def execute(self, rt: HandlerRuntime, msg: Msg) -> None:
        """Run one delivered task to its recorded outcome. The caller holds one credit
        for ``msg`` and gives it back when this returns."""


@dataclass(frozen=True, slots=True)
class RuntimeEnv:
    nc: NATS
    js: JetStreamContext
    worker_id: str
    #: the worker's groups, or ``(None,)`` for all groups
    groups: tuple[str | None, ...]
    batch: int
    pull_expires: float
    grace_period: float
    #: a partition member whose directory entry is older than this is dead
    liveness: float
    #: the worker-wide pool of execution credits
    credits: Slots
    health: WorkerHealth
    supervisor: Supervisor
    executor: Executes
    #: called after this worker's partitions changed (refreshes the directory entry)
    on_membership_change: Callable[[], Awaitable[None]]
    telemetry: Telemetry
    #: sticky assignment timeouts (the worker's sticky runtime, ``_sticky.py``)
    sticky: StickySettings
    #: the running handler runtime of a task type, if any (sticky tasks are run by it)
    runtime_of: Callable[[str], HandlerRuntime | None]
    #: consumer names, filters and settings of the engine's contract (``_dagnats.py``)
    contract: Contract
