"""Shared I/O used by task contexts and the client: checkpoints, signals, partial results.

The ``checkpoints`` and ``signals`` buckets are optional (docs/wire.md): they are bound
when present, and the calls that need them raise :class:`NotProvisionedError` naming
``jsworker kv setup`` when they are not.

Values in those buckets are JSON. Anyone with access to the bucket can write other
bytes; reading such a value raises :class:`CorruptValueError`, which a handler can catch
and which, uncaught, fails the task permanently (it is a ``PermanentError``): retrying
would read the same bytes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from . import _names as n
from ._aio import raise_if_cancelling
from ._errors import InvalidNameError, NotProvisionedError, PermanentError, TaskError
from ._wire import dumps, loads, now_rfc3339, to_json_value

if TYPE_CHECKING:
    from ._context import TaskInfo

KV_DEL_OPS = ("DEL", "PURGE")
CHUNK_SEQ = "Jsw-Seq"
CANCEL_SIGNAL = "_cancel"


class SignalTimeoutError(TaskError, TimeoutError):
    """``wait_for_signal`` timed out. Catch it to handle a missing signal."""


class CorruptValueError(PermanentError):
    """A signal or checkpoint value is not JSON (written by something other than
    jsworker). Raised by ``wait_for_signal``, ``load_checkpoint`` and
    ``Client``/``Services.list_signals``; attributes ``bucket``, ``key`` and ``value``
    (the raw bytes). A handler may catch it; uncaught, it is a ``PermanentError``: the
    task fails with kind ``non_retriable`` and is dead-lettered, not retried."""

    def __init__(self, bucket: str, key: str, value: bytes, reason: str) -> None:
        super().__init__(
            f"{bucket} value {key!r} is not JSON ({len(value)} bytes, {value[:40]!r}): {reason}"
        )
        self.bucket = bucket
        self.key = key
        self.value = value


def decode_value(bucket: str, key: str, value: bytes | None) -> Any:
    """A KV value as JSON (empty: ``None``), or :class:`CorruptValueError`. Strict:
    ``NaN``, ``Infinity`` and invalid UTF-8 are refused as the wire refuses them."""
    if not value:
        return None
    try:
        return loads(value)
    except ValueError as e:
        raise CorruptValueError(bucket, key, bytes(value), str(e)) from None


class Services:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.checkpoints: KeyValue | None = None
        self.signals: KeyValue | None = None
        self._bound = False
        #: DagNats mode: ``bytes`` checkpoints and signal data are stored as they are
        #: (DagNats stores raw bytes); other values as JSON, as in standalone mode
        self.raw = False

    async def bind_optional(self) -> None:
        """Bind the optional buckets if they exist (called by ``Worker.start``)."""
        self.checkpoints = await _try_bucket(self.js, n.CHECKPOINTS_BUCKET)
        self.signals = await _try_bucket(self.js, n.SIGNALS_BUCKET)
        self._bound = True

    async def _need(self, which: str) -> KeyValue:
        if not self._bound:
            await self.bind_optional()
        kv = self.checkpoints if which == n.CHECKPOINTS_BUCKET else self.signals
        if kv is None:
            # re-check once: the bucket may have been created since start
            kv = await _try_bucket(self.js, which)
            if which == n.CHECKPOINTS_BUCKET:
                self.checkpoints = kv
            else:
                self.signals = kv
        if kv is None:
            raise NotProvisionedError(
                f"KV bucket {which!r} does not exist: run `jsworker kv setup` "
                "(or jsworker.setup_kv_buckets(nc)) to enable "
                + ("checkpoints" if which == n.CHECKPOINTS_BUCKET else "signals")
            )
        return kv

    # ------------------------------------------------------------ checkpoints
    async def save_checkpoint(self, info: TaskInfo, state: object) -> None:
        kv = await self._need(n.CHECKPOINTS_BUCKET)
        await kv.put(n.checkpoint_key(info.run_id, info.step_id), self._encode(state, "checkpoint"))

    def _encode(self, value: object, what: str) -> bytes:
        if self.raw and isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        return dumps(to_json_value(value, what))

    async def load_checkpoint_bytes(self, info: TaskInfo) -> bytes | None:
        kv = await self._need(n.CHECKPOINTS_BUCKET)
        try:
            entry = await kv.get(n.checkpoint_key(info.run_id, info.step_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return bytes(entry.value or b"")

    async def load_checkpoint(self, info: TaskInfo) -> Any:
        value = await self.load_checkpoint_bytes(info)
        key = n.checkpoint_key(info.run_id, info.step_id)
        return decode_value(n.CHECKPOINTS_BUCKET, key, value)

    async def clear_checkpoint(self, run_id: str, step_id: str) -> None:
        """Delete a finished task's checkpoint (no error when the bucket is missing)."""
        if self.checkpoints is None:
            return
        try:
            await self.checkpoints.purge(n.checkpoint_key(run_id, step_id))
        except nats.js.errors.Error:
            pass

    # ---------------------------------------------------------------- signals
    async def send_signal(self, run_id: str, name: str, data: object = None) -> int:
        n.validate_token(run_id, "run id")
        n.validate_token(name, "signal name")
        if name.startswith("_"):
            raise InvalidNameError(f"signal name {name!r}: names starting with '_' are reserved")
        kv = await self._need(n.SIGNALS_BUCKET)
        return await kv.put(n.signal_key(run_id, name), self._encode(data, "signal data"))

    async def list_signals(self, run_id: str) -> dict[str, Any]:
        """Current signals of a run, by name (reserved ``_`` names included)."""
        n.validate_token(run_id, "run id")
        kv = await self._need(n.SIGNALS_BUCKET)
        out: dict[str, Any] = {}
        for key, value in (await kv_snapshot(kv, f"{run_id}.>")).items():
            out[key[len(run_id) + 1 :]] = decode_value(n.SIGNALS_BUCKET, key, value)
        return out

    async def wait_for_signal(self, run_id: str, name: str, timeout: float) -> Any:
        key = n.signal_key(run_id, name)
        return decode_value(
            n.SIGNALS_BUCKET, key, await self.wait_for_signal_bytes(run_id, name, timeout)
        )

    async def wait_for_signal_bytes(self, run_id: str, name: str, timeout: float) -> bytes:
        n.validate_token(name, "signal name")
        kv = await self._need(n.SIGNALS_BUCKET)
        # A watch delivers the key's current value first, so a signal sent before the
        # wait started is not missed.
        watcher = await kv.watch(n.signal_key(run_id, name))
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SignalTimeoutError(
                        f"signal {name!r} for run {run_id} did not arrive within {timeout:g}s"
                    )
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                finally:
                    raise_if_cancelling()  # a cancel updates() swallowed (Python 3.11)
                if entry is None or entry.operation in KV_DEL_OPS:
                    continue
                return bytes(entry.value or b"")
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    # -------------------------------------------------------------- streaming
    async def publish_chunk(self, info: TaskInfo, chunk: object, seq: int) -> None:
        data = dumps(to_json_value(chunk, "chunk"))
        await self.nc.publish(
            n.stream_subject(info.run_id, info.step_id), data, headers={CHUNK_SEQ: str(seq)}
        )

    # ----------------------------------------------------------- cancellation
    async def request_cancel(self, run_id: str, reason: str = "") -> int:
        """Record that run ``run_id`` is cancelled (KV ``signals``, key
        ``{run_id}._cancel``). Queued tasks of the run will not start; running ones
        are asked to stop."""
        n.validate_token(run_id, "run id")
        kv = await self._need(n.SIGNALS_BUCKET)
        body = {"reason": reason or "cancelled", "at": now_rfc3339()}
        return await kv.put(n.signal_key(run_id, CANCEL_SIGNAL), dumps(body))


async def kv_snapshot(kv: KeyValue, pattern: str = ">") -> dict[str, bytes]:
    """Current values of the keys matching ``pattern``.

    Keys come from the bucket stream's subject list (a server-side filter) and values
    from ``get``; deleted keys are skipped. Not nats-py's ``keys()``/watch: its "no more
    values" marker can come before values already in flight, so it sometimes answers
    with an empty list for a bucket that has keys (seen in a fresh CI run)."""
    bucket = kv._name  # nats-py keeps the bucket name only here
    info = await kv._js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{pattern}")
    prefix = f"$KV.{bucket}."
    out: dict[str, bytes] = {}
    for subject in sorted(info.state.subjects or {}):
        key = subject[len(prefix) :]
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # deleted or purged (KeyDeletedError too)
            continue
        out[key] = entry.value or b""
    return out


async def _try_bucket(js: Any, bucket: str) -> KeyValue | None:
    try:
        kv: KeyValue = await js.key_value(bucket)
        return kv
    except nats.js.errors.BucketNotFoundError:
        return None
    except nats.js.errors.NotFoundError:
        return None
