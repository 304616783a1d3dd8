"""OpenTelemetry from the command line: ``jsworker task submit`` in one process and
``jsworker serve`` in another share one trace (spans read from ``--otel-console``), OTLP
export switched on by ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a real HTTP receiver decodes what
arrives), and the environment rules."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import jsworker
from jsworker.cli._otel import exporters
from jsworker.cli._output import CLIError

APP = textwrap.dedent(
    """
    import os
    import jsworker

    def make_worker(nc):
        w = jsworker.Worker(nc)

        @w.handle(os.environ["OTEL_TEST_TYPE"])
        async def h(ctx):
            return {"traced": ctx.json()}

        return w
    """
)


def spans_in(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"context"' in line:
            out.append(json.loads(line))
    return out


async def until(pred: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_submit_and_serve_share_one_trace(
    nc: NATS, server_env: dict[str, str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    ttype = unique("otelcli")
    (tmp_path / "otelapp.py").write_text(APP)
    env = {**server_env, "OTEL_TEST_TYPE": ttype, "NO_COLOR": "1"}
    args = ["serve", "otelapp:make_worker", "--app-dir", str(tmp_path), "--otel-console"]
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jsworker.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def serving() -> bool:
            assert serve.returncode is None, "serve exited"
            return any(ttype in e.get("task_types", []) for e in await jsworker.list_workers(nc))

        await until(serving, "the serve process to register")
        submit = ["task", "submit", ttype, "7", "--wait", "--json", "--otel-console"]
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jsworker.cli", *submit],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["output"] == {"traced": 7}
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(serve.communicate(), 60)
    serve_err = err_bytes.decode()
    assert serve.returncode == 0, serve_err
    [producer] = [s for s in spans_in(p.stderr) if s["name"] == f"send {ttype}"]
    [consumer] = [s for s in spans_in(serve_err) if s["name"] == f"task {ttype}"]
    assert producer["kind"] == "SpanKind.PRODUCER" and consumer["kind"] == "SpanKind.CONSUMER"
    assert consumer["context"]["trace_id"] == producer["context"]["trace_id"]
    assert consumer["parent_id"] == producer["context"]["span_id"]
    assert consumer["attributes"]["task.run_id"] == out["run_id"]
    assert consumer["attributes"]["task.outcome"] == "completed"
    assert producer["resource"]["attributes"]["service.name"] == "jsworker-cli"
    assert consumer["resource"]["attributes"]["service.name"] == "jsworker-serve"


class _Receiver(BaseHTTPRequestHandler):
    got: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.got.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    got: list[tuple[str, str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"got": got})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", got
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_otlp_export_switched_on_by_the_environment(
    server_env: dict[str, str],
    unique: Callable[[str], str],
    otlp_receiver: tuple[str, list[tuple[str, str, bytes]]],
) -> None:
    url, got = otlp_receiver
    ttype = unique("otlp")
    env = {
        **server_env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_SERVICE_NAME": "checkout",
        "OTEL_METRICS_EXPORTER": "none",
    }
    p = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jsworker.cli", "task", "submit", ttype, "{}", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    run_id = json.loads(p.stdout)["run_id"]
    traces = [(ct, body) for path, ct, body in got if path == "/v1/traces"]
    assert traces, got  # flushed before the command exited
    req = ExportTraceServiceRequest()
    req.ParseFromString(traces[0][1])
    assert traces[0][0] == "application/x-protobuf"
    [rs] = req.resource_spans
    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
    assert resource["service.name"] == "checkout"
    [span] = [s for ss in rs.scope_spans for s in ss.spans]
    assert span.name == f"send {ttype}"
    attrs = {a.key: a.value.string_value for a in span.attributes}
    assert attrs["task.run_id"] == run_id
    await _purge(server_env, ttype)


async def _purge(env: dict[str, str], ttype: str) -> None:
    import nats

    nc = await nats.connect(env["NATS_URL"])
    try:
        await nc.jetstream().purge_stream("TASK_QUEUES", subject=f"task.{ttype}.>")
    finally:
        await nc.close()


def test_environment_rules() -> None:
    t = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    assert exporters({}, "TRACES", t) == set()  # nothing set: off (no surprise exports)
    assert exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "TRACES", t) == {"otlp"}
    assert exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c"}, "TRACES", t) == {"otlp"}
    assert exporters({"OTEL_TRACES_EXPORTER": "console,otlp"}, "TRACES", t) == {"console", "otlp"}
    assert exporters({"OTEL_TRACES_EXPORTER": "none"}, "TRACES", t) == set()
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    assert exporters(disabled, "TRACES", t) == set()
    with pytest.raises(CLIError, match="unknown exporter 'zipkin'"):
        exporters({"OTEL_TRACES_EXPORTER": "zipkin"}, "TRACES", t)


async def test_bad_exporter_is_one_line(server_env: dict[str, str]) -> None:
    p = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jsworker.cli", "task", "submit", "t", "{}"],
        env={**server_env, "OTEL_TRACES_EXPORTER": "zipkin", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "Error: OTEL_TRACES_EXPORTER='zipkin': unknown exporter 'zipkin' (jsworker knows otlp, "
        "console and none)"
    ]
