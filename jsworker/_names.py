"""Names on the wire: validation of subject tokens, subjects, consumer names.

Task types and group names become subject tokens, so anything that would change the
meaning of a subject (``.``, ``*``, ``>``), whitespace, control characters and the path
separators JetStream refuses in consumer names are refused here, before anything
reaches the server. A task type named ``a.>`` must never subscribe to everything.

Consumer names derive from one rule (:func:`consumer_name`):

* no groups: ``{type}``                  filter ``task.{type}.>``
* group g:   ``{type}__g_{group}``       filter ``task.{type}.{group}.>``

``__g_`` cannot appear inside a valid type *and* make two different (type, group)
pairs map to one name unless a type itself contains ``__g_``; such types are refused,
so the rule is injective. ``Worker.start()`` also checks an existing consumer of that
name has the expected filter before using it.

Ids (run, step, task) and partition keys follow the same token rules, with a maximum
length of :data:`MAX_ID_LEN` (128) characters. The longest subject jsworker builds,
``dead.{type}.{run_id}.{step_id}``, is then at most 391 characters (1,543 bytes even if
every character took four bytes in UTF-8): well under the server's 4096-byte control-line
limit, past which the server drops the publisher's connection (docs/wire.md, "Limits").
The client enforces these rules when it submits, and the worker enforces them on bodies
published by others (dead letter ``invalid_payload``).
"""

from __future__ import annotations

import re
import secrets

from ._errors import InvalidNameError

TASK_STREAM = "TASK_QUEUES"
STICKY_STREAM = "STICKY_TASKS"
HISTORY_STREAM = "WORKFLOW_HISTORY"
DEAD_LETTER_STREAM = "DEAD_LETTERS"

CHECKPOINTS_BUCKET = "checkpoints"
SIGNALS_BUCKET = "signals"
WORKERS_BUCKET = "workers"
RATE_LIMITS_BUCKET = "rate_limits"
STICKY_BINDINGS_BUCKET = "sticky_bindings"
PARTITION_GROUPS_BUCKET = "elastic-consumer-groups"

_GROUP_SEP = "__g_"
MAX_NAME_LEN = 128
#: longest run id, step id, task id or partition key, in characters (docs/wire.md)
MAX_ID_LEN = MAX_NAME_LEN
_FORBIDDEN = re.compile(r"[.*>\s/\\\x00-\x1f\x7f]")


def validate_token(value: object, what: str) -> str:
    """Return ``value`` if it is a valid single subject token, else raise.

    Refused: non-strings, empty strings, ``.``, ``*``, ``>``, whitespace, ``/``, ``\\``,
    control characters, and names longer than 128 characters.
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidNameError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidNameError(f"{what} {value[:20]!r}... is longer than {MAX_NAME_LEN} chars")
    m = _FORBIDDEN.search(value)
    if m:
        ch = m.group(0)
        desc = {".": "'.' (subject separator)", "*": "'*' (wildcard)", ">": "'>' (wildcard)"}.get(
            ch, "whitespace" if ch.isspace() else repr(ch)
        )
        raise InvalidNameError(
            f"{what} {value!r} contains {desc}; names become NATS subject tokens and may not "
            "contain '.', '*', '>', whitespace, '/', '\\' or control characters"
        )
    return value


def validate_task_type(value: object) -> str:
    name = validate_token(value, "task type")
    if _GROUP_SEP in name:
        raise InvalidNameError(f"task type {name!r} may not contain {_GROUP_SEP!r} (reserved)")
    return name


def validate_group(value: object) -> str:
    return validate_token(value, "worker group")


def validate_run_id(value: object) -> str:
    """A run id: a subject token of at most :data:`MAX_ID_LEN` characters."""
    return validate_token(value, "run id")


def validate_step_id(value: object) -> str:
    """A step id: a subject token of at most :data:`MAX_ID_LEN` characters."""
    return validate_token(value, "step id")


def validate_task_id(value: object) -> str:
    """A task id: never a subject token today, but it is written into every event and
    dead letter, so it follows the same rules (and length) as the other ids."""
    return validate_token(value, "task id")


def validate_key(value: object) -> str:
    """A partition key: the task subject's last token."""
    return validate_token(value, "partition key")


def task_subject(task_type: str, run_id: str, group: str | None = None) -> str:
    if group:
        return f"task.{task_type}.{group}.{run_id}"
    return f"task.{task_type}.{run_id}"


def task_filter(task_type: str, group: str | None = None) -> str:
    if group:
        return f"task.{task_type}.{group}.>"
    return f"task.{task_type}.>"


def consumer_name(task_type: str, group: str | None = None) -> str:
    if group:
        return f"{task_type}{_GROUP_SEP}{group}"
    return task_type


def history_subject(run_id: str) -> str:
    return f"history.{run_id}"


def stream_subject(run_id: str, step_id: str) -> str:
    return f"stream.{run_id}.{step_id}"


def dead_subject(task_type: str, run_id: str, step_id: str) -> str:
    return f"dead.{task_type}.{run_id}.{step_id}"


def checkpoint_key(run_id: str, step_id: str) -> str:
    return f"{run_id}.{step_id}"


def signal_key(run_id: str, name: str) -> str:
    return f"{run_id}.{name}"


def new_worker_id() -> str:
    return f"worker-{secrets.token_hex(8)}"


def new_run_id() -> str:
    return f"run-{secrets.token_hex(10)}"


def new_task_id() -> str:
    return secrets.token_hex(12)


# ------------------------------------------------------------------ worker ids
MAX_WORKER_ID_LEN = 64
_WORKER_ID = re.compile(r"[A-Za-z0-9_=-]+")


def validate_worker_id(value: object) -> str:
    """Return ``value`` if it can be a worker id, else raise :class:`InvalidNameError`.

    A worker id is a key in the KV bucket ``workers`` and a subject token (partition
    member and consumer names derive from it), so it is 1-64 characters from
    ``A-Z a-z 0-9 - _ =``: the characters both a NATS KV key and a subject token accept,
    without ``.`` (a subject separator) and ``/``. The default, ``worker-{16 hex}``,
    is 23 characters.
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"worker id must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidNameError("worker id must not be empty")
    if len(value) > MAX_WORKER_ID_LEN:
        raise InvalidNameError(
            f"worker id {value[:20]!r}... is {len(value)} characters, more than {MAX_WORKER_ID_LEN}"
        )
    if not _WORKER_ID.fullmatch(value):
        bad = next(ch for ch in value if not _WORKER_ID.fullmatch(ch))
        raise InvalidNameError(
            f"worker id {value!r} contains {bad!r}; worker ids are KV keys and subject "
            "tokens: use only letters, digits, '-', '_' and '='"
        )
    return value
