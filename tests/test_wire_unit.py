"""Pure logic of the wire contract (docs/wire.md), no server: task body validation (the
same rules as the client), NaN/infinity refusal, shrinking records to fit
``max_payload``, header sizes, publish-error classification, KV value decoding."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsworker
from jsworker import _names as n
from jsworker import _wire as w
from jsworker._outcomes import UnrecordableError, check_subject, is_permanent
from jsworker._services import CorruptValueError, decode_value


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


# ------------------------------------------------------------ task body decoding
def test_decode_defaults() -> None:
    p = w.TaskPayload.decode(body(run_id="r1"))
    assert (p.run_id, p.step_id, p.task_id, p.iteration, p.attempt) == ("r1", "main", "r1", 0, 1)
    assert (p.input, p.metadata, p.traceparent, p.tracestate) == (None, {}, "", "")


def test_decode_null_fields_take_defaults() -> None:
    p = w.TaskPayload.decode(
        body(run_id="r1", step_id=None, task_id=None, iteration=None, metadata=None)
    )
    assert (p.step_id, p.task_id, p.iteration, p.metadata) == ("main", "r1", 0, {})


def test_decode_round_trips_the_clients_encoding() -> None:
    p = w.TaskPayload("t1", "r1", "s1", 3, 2, {"a": [1, 2.5, "ü"]}, {"k": "v"}, "tp", "ts")
    assert w.TaskPayload.decode(p.encode()) == p


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"run_id": "bad run"}, "run id 'bad run' contains whitespace"),
        ({"run_id": "*"}, "run id '*' contains '*' (wildcard)"),
        ({"run_id": "x>"}, "run id 'x>' contains '>' (wildcard)"),
        ({"run_id": "a.b"}, "run id 'a.b' contains '.'"),
        ({"run_id": "r" * 129}, "longer than 128"),
        ({"run_id": "r" * 5000}, "longer than 128"),
        ({"run_id": ""}, "run id must not be empty"),
        ({"run_id": 12}, "run id must be a string, got int"),
        ({"run_id": None}, "run id must be a string, got NoneType"),
        ({"input": 1}, "no run_id"),
        ({"run_id": "r", "step_id": "bad step"}, "step id 'bad step' contains whitespace"),
        ({"run_id": "r", "step_id": "s" * 129}, "step id"),
        ({"run_id": "r", "step_id": 5}, "step id must be a string"),
        ({"run_id": "r", "task_id": 42}, "task id must be a string"),
        ({"run_id": "r", "task_id": "a\x00b"}, "task id"),
        ({"run_id": "r", "iteration": -1}, "iteration must be an integer between 0 and"),
        ({"run_id": "r", "iteration": "3"}, "iteration must be an integer"),
        ({"run_id": "r", "iteration": 1.5}, "iteration must be an integer"),
        ({"run_id": "r", "iteration": True}, "iteration must be an integer"),
        ({"run_id": "r", "iteration": 2**31}, "iteration must be an integer"),
        ({"run_id": "r", "attempt": "x"}, "attempt must be an integer"),
        ({"run_id": "r", "metadata": [1]}, "metadata must be an object, got list"),
    ],
)
def test_decode_refuses(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(jsworker.PayloadError) as e:
        w.TaskPayload.decode(body(**fields))
    assert says in str(e.value)
    assert len(str(e.value)) < 400  # one readable line, even for a 5,000-character id


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"run_id": NaN}', "not valid JSON"),
        (b'{"run_id": "r", "input": 1e400}', "not valid JSON"),
        (b'{"run_id": "r", "input": Infinity}', "not valid JSON"),
        (b'{"run_id": "\xff"}', "not valid JSON"),
        (b'{"run_id": "\\ud800"}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"r"', "must be a JSON object, got str"),
    ],
)
def test_decode_refuses_bodies(data: bytes, says: str) -> None:
    with pytest.raises(jsworker.PayloadError, match=says):
        w.TaskPayload.decode(data)


def test_decode_accepts_the_longest_ids() -> None:
    p = w.TaskPayload.decode(body(run_id="r" * 128, step_id="s" * 128, task_id="t" * 128))
    assert (len(p.run_id), len(p.step_id), len(p.task_id)) == (128, 128, 128)
    assert n.MAX_ID_LEN == 128


def test_decode_ignores_bad_trace_context_and_unknown_fields() -> None:
    p = w.TaskPayload.decode(
        body(run_id="r", traceparent=5, tracestate="x" * 513, future_field={"a": 1})
    )
    assert (p.traceparent, p.tracestate) == ("", "")
    p = w.TaskPayload.decode(body(run_id="r", traceparent="00-ab-cd-01", tracestate="k=v"))
    assert (p.traceparent, p.tracestate) == ("00-ab-cd-01", "k=v")


def test_decode_metadata_values_become_strings() -> None:
    p = w.TaskPayload.decode(body(run_id="r", metadata={"n": 3, "b": True, "s": "x", "o": {}}))
    assert p.metadata == {"n": "3", "b": "true", "s": "x", "o": "{}"}


@pytest.mark.parametrize(
    "subject", ["task.t.r1", "task.t.gpu.r1", "task.t.gpu." + "k" * 128, "task.t-1.g_2.key-3"]
)
def test_decode_accepts_task_subjects(subject: str) -> None:
    assert w.TaskPayload.decode(body(run_id="r1"), subject).run_id == "r1"


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("task.t", "is not task.{type}.{key}"),
        ("task.t.a.b.c", "is not task.{type}.{key}"),
        ("other.t.r", "is not task.{type}.{key}"),
        ("task.t." + "k" * 129, "partition key"),
        ("task.t.g." + "k" * 129, "partition key"),
        ("task.t.*", "partition key '*'"),
        ("task.t.g*.r", "worker group"),
    ],
)
def test_decode_refuses_task_subjects(subject: str, says: str) -> None:
    with pytest.raises(jsworker.PayloadError) as e:
        w.TaskPayload.decode(body(run_id="r1"), subject)
    assert says in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=140), st.sampled_from(["*", "x>", ">", "a.b", "é", "-"])))
def test_decode_accepts_exactly_the_ids_the_client_accepts(ident: str) -> None:
    """The worker's rule for a foreign body is the client's rule (``_names``)."""
    try:
        n.validate_run_id(ident)
        client_ok = True
    except jsworker.InvalidNameError:
        client_ok = False
    for field in ("run_id", "step_id", "task_id"):
        fields = {"run_id": "r", field: ident}
        if field != "run_id" and not ident:
            continue  # an empty step/task id takes its default
        try:
            w.TaskPayload.decode(body(**fields))
            worker_ok = True
        except jsworker.PayloadError:
            worker_ok = False
        assert worker_ok == client_ok, (field, ident)


# ------------------------------------------------------------ NaN and infinities
@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -math.inf,
        [1, float("nan")],
        {"a": {"b": [0.5, float("inf")]}},
        (1, -math.inf),
        {"big": 2**70, "x": float("nan")},  # the stdlib fallback path (int over 64 bits)
        b"NaN",
        b'{"a": Infinity}',
    ],
)
def test_to_json_value_refuses_nan_and_infinity(value: object) -> None:
    with pytest.raises(jsworker.PayloadError) as e:
        w.to_json_value(value, "input")
    assert str(e.value).startswith("input ")


def test_nan_error_says_where() -> None:
    with pytest.raises(jsworker.PayloadError, match=r"holds inf at \$\['a'\]\['b'\]\[1\]"):
        w.to_json_value({"a": {"b": [0.5, float("inf")]}}, "input")


@pytest.mark.parametrize(
    "value", [None, 1.5, 0.0, -2, "null", [None, 1.0], {"a": None}, 2**70, b'{"a":null}']
)
def test_to_json_value_accepts_finite_values(value: object) -> None:
    w.to_json_value(value, "input")


# ------------------------------------------------------------ shrink to fit
def test_shrink_leaves_a_fitting_doc_alone() -> None:
    doc = {"error": "short", "task": {"input": [1, 2]}}
    assert w.shrink_to_fit(dict(doc), [("task", "input"), ("error",)], 1000) == w.dumps(doc)


def test_shrink_truncates_the_large_field_with_size_and_sha256() -> None:
    value = {"text": "é" * 5000}
    full = orjson.dumps(value)
    doc: dict[str, Any] = {"kind": "x", "task": {"run_id": "r", "input": value}, "error": "e"}
    data = w.shrink_to_fit(doc, [("task", "input"), ("error",)], 2000)
    assert len(data) <= 2000
    out = json.loads(data)
    task = out["task"]
    assert task["input_truncated"] is True
    assert task["input_size"] == len(full)
    assert task["input_sha256"] == hashlib.sha256(full).hexdigest()
    assert full.decode().startswith(task["input"]) and len(task["input"]) > 500
    assert out["error"] == "e" and "error_truncated" not in out  # only what was needed
    assert task["run_id"] == "r" and out["kind"] == "x"


def test_shrink_of_a_string_hashes_the_string_itself() -> None:
    text = 'quote" backslash\\ newline\n control\x01 ' * 2000
    doc = {"payload": {"error": text}}
    data = w.shrink_to_fit(doc, [("payload", "error")], 1500)
    p = json.loads(data)["payload"]
    assert len(data) <= 1500
    assert p["error_size"] == len(text.encode())
    assert p["error_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert text.startswith(p["error"])


def test_shrink_shares_room_between_two_large_fields() -> None:
    doc = {"task": {"input": "i" * 10_000}, "output": "o" * 10_000}
    data = w.shrink_to_fit(doc, [("task", "input"), ("output",)], 4000)
    out = json.loads(data)
    assert len(data) <= 4000
    assert out["output_truncated"] and out["task"]["input_truncated"]
    assert len(out["output"]) > 1000 and len(out["task"]["input"]) > 1000


def test_shrink_raises_when_the_rest_cannot_fit() -> None:
    doc = {"fixed": "f" * 3000, "error": "e" * 3000}
    with pytest.raises(jsworker.PayloadError, match=r"over the limit of 1000 bytes even with"):
        w.shrink_to_fit(doc, [("error",)], 1000)


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
        max_leaves=30,
    ),
    error=st.text(max_size=3000),
    limit=st.integers(min_value=300, max_value=4000),
)
def test_shrink_property(value: Any, error: str, limit: int) -> None:
    """Whatever the values, the result fits, parses, and every truncated field keeps a
    prefix of its text, its size and its hash; or it raises because nothing could fit."""
    texts = {"input": w.dumps(value).decode(), "error": error}
    doc = {"kind": "k", "task": {"input": value}, "error": error}
    try:
        data = w.shrink_to_fit(doc, [("task", "input"), ("error",)], limit)
    except jsworker.PayloadError:
        skeleton = {
            "kind": "k",
            "task": {
                "input": "",
                "input_truncated": True,
                "input_size": 0,
                "input_sha256": "0" * 64,
            },
            "error": "",
            "error_truncated": True,
            "error_size": 0,
            "error_sha256": "0" * 64,
        }
        assert len(w.dumps(skeleton)) > limit - 20
        return
    assert len(data) <= limit
    out = json.loads(data)
    for parent, key in ((out["task"], "input"), (out, "error")):
        if parent.get(f"{key}_truncated"):
            raw = texts[key].encode()
            assert parent[f"{key}_size"] == len(raw)
            assert parent[f"{key}_sha256"] == hashlib.sha256(raw).hexdigest()
            assert texts[key].startswith(parent[key])
    if not out["task"].get("input_truncated"):
        assert out["task"]["input"] == json.loads(texts["input"])


def test_prefix_within_never_splits_a_character() -> None:
    for room in range(0, 20):
        p = w.prefix_within('😀é"a\x02' * 5, room)
        assert len(orjson.dumps(p)) - 2 <= room
        assert ('😀é"a\x02' * 5).startswith(p)


# ------------------------------------------------------------ headers and errors
def test_headers_size_is_what_nats_py_sends() -> None:
    assert w.headers_size(None) == 0
    assert w.headers_size({"Nats-Msg-Id": "abc"}) == len(b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n")
    two = {"Nats-Msg-Id": "r.s.0", "X-Ü": " é "}
    assert w.headers_size(two) == len("NATS/1.0\r\nNats-Msg-Id: r.s.0\r\nX-Ü: é\r\n\r\n".encode())


@pytest.mark.parametrize(
    "error",
    [
        UnrecordableError("x"),
        jsworker.PayloadError("x"),
        nats.errors.BadSubjectError(),
        nats.errors.MaxPayloadError(),
        nats.errors.BadHeaderError("k"),
        nats.js.errors.APIError(code=400, err_code=10054, description="message size exceeds"),
        TypeError("Type is not JSON serializable"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ],
)
def test_permanent_publish_errors(error: BaseException) -> None:
    assert is_permanent(error)


@pytest.mark.parametrize(
    "error",
    [
        nats.errors.TimeoutError(),
        TimeoutError(),
        nats.errors.NoRespondersError(),
        nats.errors.ConnectionClosedError(),
        nats.errors.OutboundBufferLimitError(),
        nats.errors.StaleConnectionError(),
        nats.js.errors.ServiceUnavailableError(code=503, description="JetStream not in sync"),
        nats.js.errors.APIError(code=500, err_code=10008, description="no leader"),
        nats.js.errors.NoStreamResponseError(),
        OSError("connection reset"),
    ],
)
def test_transient_publish_errors(error: BaseException) -> None:
    assert not is_permanent(error)


@pytest.mark.parametrize(
    "subject",
    [
        "history.a b",
        "history.*",
        "history.x>",
        "history..a",
        "history.",
        "dead.t.\tr.s",
        "h" * 2049,
    ],
)
def test_check_subject_refuses(subject: str) -> None:
    with pytest.raises(UnrecordableError):
        check_subject(subject)


def test_check_subject_accepts_the_longest_subject_jsworker_builds() -> None:
    longest = n.dead_subject("t" * 128, "😀" * 128, "s" * 128)
    assert len(longest.encode()) < 2048
    check_subject(longest)
    check_subject(n.history_subject("r-1"))


# ------------------------------------------------------------ KV values
def test_decode_value() -> None:
    assert decode_value("signals", "r.x", b"") is None
    assert decode_value("signals", "r.x", None) is None
    assert decode_value("signals", "r.x", b'{"a":1}') == {"a": 1}


@pytest.mark.parametrize("raw", [b"{not json", b"NaN", b"\xff\xfe", b'{"a":Infinity}', b"1e400"])
def test_corrupt_kv_value(raw: bytes) -> None:
    with pytest.raises(CorruptValueError) as e:
        decode_value("checkpoints", "r.s", raw)
    assert isinstance(e.value, jsworker.PermanentError)
    assert (e.value.bucket, e.value.key, e.value.value) == ("checkpoints", "r.s", raw)
    assert "checkpoints value 'r.s' is not JSON" in str(e.value)


def test_b64_round_trip_of_a_truncated_prefix_is_a_prefix() -> None:
    """What dead_invalid relies on: base64 of a byte prefix decodes to that prefix."""
    raw = bytes(range(256)) * 10
    keep = 1000 // 4 * 3
    assert base64.b64decode(base64.b64encode(raw[:keep])) == raw[:keep]
