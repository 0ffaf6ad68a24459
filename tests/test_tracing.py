"""Tracing end to end: real node processes export OTLP/HTTP to a receiver this test runs."""
from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

import nalar
from nalar.bus import tracing

from conftest import node_env

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan  # noqa: E402

SERVER, CLIENT, INTERNAL = PbSpan.SPAN_KIND_SERVER, PbSpan.SPAN_KIND_CLIENT, PbSpan.SPAN_KIND_INTERNAL


class Receiver:
    """A minimal OTLP/HTTP (protobuf) trace receiver that records every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.cond = threading.Condition()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    enc = (self.headers.get("Content-Encoding") or "").lower()
                    if enc == "gzip":
                        body = gzip.decompress(body)
                    elif enc == "deflate":
                        body = zlib.decompress(body)
                    if self.path.split("?")[0] != "/v1/traces":
                        raise ValueError(f"unexpected path {self.path}")
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    rec._record(req)
                except Exception as e:  # noqa: BLE001 - reported by the test
                    with rec.cond:
                        rec.errors.append(repr(e))
                        rec.cond.notify_all()
                    self.send_response(400)
                    self.end_headers()
                    return
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _record(self, req: ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({"trace": s.trace_id.hex(), "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() if s.parent_span_id else "",
                                "name": s.name, "kind": s.kind,
                                "node": res.get("nalar.node"), "service": res.get("service.name")})
        with self.cond:
            self.spans.extend(got)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> list[dict[str, Any]]:
        with self.cond:
            ok = self.cond.wait_for(lambda: bool(self.errors) or predicate(self.spans), timeout)
            assert not self.errors, f"receiver failed to parse an export: {self.errors}"
            assert ok, f"timed out waiting for spans; got {[(s['name'], s['node']) for s in self.spans]}"
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


CLIENT_SCRIPT = """
import sys
import nalar
c = nalar.connect(sys.argv[1], sys.argv[2], name="tracer-client")
print(c.stub("Planner").plan(2, 3).result(30))
c.close()
"""


def _complete(spans: list[dict[str, Any]]) -> bool:
    names = [s["name"] for s in spans]
    return (names.count("call Planner.plan") >= 1 and names.count("Planner.plan") >= 1
            and sum(n.startswith("call Calc.") for n in names) >= 3
            and sum(n.startswith("Calc.") for n in names) >= 3
            and names.count("queue") >= 4)


def test_one_request_is_one_trace_across_processes(receiver: Receiver, start_node: Callable[..., Any],
                                                    nats_url: str, namespace: str) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    node_a = start_node("sample_actors:Planner", name="nodeA", env=otel)
    node_b = start_node("sample_actors:Calc", name="nodeB", env=otel)

    run = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, nats_url, namespace],
                         env=node_env(otel), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "'value': 10" in run.stdout, run.stdout

    # Batched spans go out within OTEL_BSP_SCHEDULE_DELAY; a graceful stop flushes whatever is left.
    node_a.stop()
    node_b.stop()
    spans = receiver.wait(_complete)

    by_id = {s["id"]: s for s in spans}
    assert len(by_id) == len(spans), "a span was exported twice"
    assert len({s["trace"] for s in spans}) == 1, f"more than one trace: {spans}"

    roots = [s for s in spans if s["name"] == "call Planner.plan"]
    assert len(roots) == 1
    root = roots[0]
    assert root["kind"] == CLIENT and root["parent"] == ""
    assert root["node"] == "tracer-client" or root["node"] is None

    plans = [s for s in spans if s["name"] == "Planner.plan"]
    assert len(plans) == 1
    plan = plans[0]
    assert plan["kind"] == SERVER and plan["parent"] == root["id"]
    assert plan["node"] == "nodeA"

    calls = [s for s in spans if s["name"].startswith("call Calc.")]
    assert sorted(s["name"] for s in calls) == ["call Calc.add", "call Calc.add", "call Calc.where"]
    for s in calls:
        assert s["kind"] == CLIENT and s["parent"] == plan["id"], s
        assert s["node"] == "nodeA"

    execs = [s for s in spans if s["name"].startswith("Calc.")]
    assert sorted(s["name"] for s in execs) == ["Calc.add", "Calc.add", "Calc.where"]
    call_ids = {s["id"] for s in calls}
    assert {s["parent"] for s in execs} == call_ids, "each Calc call has exactly one executor span"
    for s in execs:
        assert s["kind"] == SERVER
        assert by_id[s["parent"]]["name"] == "call " + s["name"]
        assert s["node"] == "nodeB"

    queues = [s for s in spans if s["name"] == "queue"]
    assert len(queues) == 4
    server_ids = {plan["id"]} | {s["id"] for s in execs}
    assert {q["parent"] for q in queues} == server_ids
    for q in queues:
        assert q["kind"] == INTERNAL
        assert q["node"] == by_id[q["parent"]]["node"]

    assert len(spans) == 1 + 1 + 3 + 3 + 4


def test_tracing_off_without_endpoint(client: nalar.Client, start_node: Callable[..., Any]) -> None:
    start_node("sample_actors:Calc", name="plain")
    assert tracing.TRACER is None
    assert client.stub("Calc").add(1, 2).result(30) == 3
    assert tracing.TRACER is None
