"""Names that become subject tokens: every refused shape is refused before the server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nats.aio.client import Client as NATS

import jsworker
from jsworker import _names

BAD_NAMES = [
    pytest.param("a.b", id="dot"),
    pytest.param("a.>", id="dot-gt"),
    pytest.param(">", id="gt"),
    pytest.param("*", id="star"),
    pytest.param("a*", id="star-suffix"),
    pytest.param("a>", id="gt-suffix"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\nb", id="newline"),
    pytest.param(" ", id="only-space"),
    pytest.param("", id="empty"),
    pytest.param("x" * 129, id="too-long"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\x00b", id="nul"),
]


async def _noop(ctx: jsworker.TaskContext) -> None:
    return None


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_task_type_refused_by_worker(nc: NATS, name: str) -> None:
    w = jsworker.Worker(nc)
    with pytest.raises(jsworker.InvalidNameError) as ei:
        w.handle(name, _noop)
    assert "task type" in str(ei.value)
    assert w.task_types == []


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_task_type_refused_by_decorator(nc: NATS, name: str) -> None:
    w = jsworker.Worker(nc)
    # the decorator form refuses the name when it is called, not when it decorates
    with pytest.raises(jsworker.InvalidNameError):
        w.handle(name)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_task_type_refused_by_client(nc: NATS, name: str) -> None:
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).submit(name, {"x": 1})


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_group_refused_by_worker(nc: NATS, name: str) -> None:
    with pytest.raises(jsworker.InvalidNameError) as ei:
        jsworker.Worker(nc, groups=("ok", name))
    assert "group" in str(ei.value)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_group_refused_by_client(nc: NATS, name: str, unique: Callable[[str], str]) -> None:
    # only None means "no group": an empty group name is refused like the others
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).submit(unique("t"), {"x": 1}, group=name)


@pytest.mark.parametrize("field", ["run_id", "step_id"])
@pytest.mark.parametrize("name", ["a.b", "*", ">", "a b", ""])
async def test_run_and_step_ids_refused_by_client(
    nc: NATS, unique: Callable[[str], str], field: str, name: str
) -> None:
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).submit(unique("t"), None, **{field: name})  # type: ignore[arg-type]


async def test_bad_type_publishes_nothing(nc: NATS, unique: Callable[[str], str]) -> None:
    """``a.>`` must never reach the server: no task is stored under ``task.{prefix}.>``."""
    prefix = unique("p")
    with pytest.raises(jsworker.InvalidNameError):
        await jsworker.Client(nc).submit(f"{prefix}.>", {"x": 1})
    info = await nc.jetstream().stream_info("TASK_QUEUES", subjects_filter=f"task.{prefix}.>")
    assert not info.state.subjects


def test_non_string_names_refused() -> None:
    for value in (None, 1, b"abc", ("a",)):
        with pytest.raises(jsworker.InvalidNameError, match="must be a string"):
            _names.validate_task_type(value)
        with pytest.raises(jsworker.InvalidNameError):
            _names.validate_group(value)


def test_error_message_names_the_problem() -> None:
    with pytest.raises(jsworker.InvalidNameError, match="wildcard"):
        _names.validate_task_type("a>")
    with pytest.raises(jsworker.InvalidNameError, match="subject separator"):
        _names.validate_task_type("a.b")
    with pytest.raises(jsworker.InvalidNameError, match="whitespace"):
        _names.validate_task_type("a b")
    with pytest.raises(jsworker.InvalidNameError, match="empty"):
        _names.validate_task_type("")
    with pytest.raises(jsworker.InvalidNameError, match="longer than 128"):
        _names.validate_task_type("y" * 129)


def test_invalid_name_is_a_config_error() -> None:
    assert issubclass(jsworker.InvalidNameError, jsworker.ConfigError)
    assert issubclass(jsworker.InvalidNameError, ValueError)
    assert issubclass(jsworker.ConfigError, jsworker.JSWorkerError)


def test_valid_names_accepted() -> None:
    for name in ("email", "send-email", "a_b", "A1", "x" * 128, "ünïcode", "a:b", "a-b_c"):
        assert _names.validate_task_type(name) == name
        assert _names.validate_group(name) == name


def test_consumer_name_rule_is_collision_free() -> None:
    # the group separator is reserved in task types, so (type, group) pairs never collide
    assert _names.consumer_name("email") == "email"
    assert _names.consumer_name("email", "gpu") == "email__g_gpu"
    with pytest.raises(jsworker.InvalidNameError, match="reserved"):
        _names.validate_task_type("email__g_gpu")
    pairs = [("a", None), ("a", "b"), ("a_", "b"), ("a", "_b"), ("a_g", "b"), ("a", "g_b")]
    names = {_names.consumer_name(t, g) for t, g in pairs}
    assert len(names) == len(pairs)


async def test_reserved_separator_refused_at_registration(nc: NATS) -> None:
    w = jsworker.Worker(nc)
    with pytest.raises(jsworker.InvalidNameError):
        w.handle("email__g_gpu", _noop)


def test_subjects_follow_the_contract() -> None:
    assert _names.task_subject("email", "r1") == "task.email.r1"
    assert _names.task_subject("email", "r1", "gpu") == "task.email.gpu.r1"
    assert _names.task_filter("email") == "task.email.>"
    assert _names.task_filter("email", "gpu") == "task.email.gpu.>"
    assert _names.history_subject("r1") == "history.r1"
    assert _names.dead_subject("email", "r1", "s1") == "dead.email.r1.s1"
    assert _names.stream_subject("r1", "s1") == "stream.r1.s1"
    wid = _names.new_worker_id()
    assert wid.startswith("worker-") and len(wid) == len("worker-") + 16
    int(wid[len("worker-") :], 16)
