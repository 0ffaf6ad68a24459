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


def _value(v: Any) -> Any:
    """An OTLP ``AnyValue`` as Python."""
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


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
                                "node": res.get("nalar.node"), "service": res.get("service.name"),
                                "attrs": {a.key: _value(a.value) for a in s.attributes},
                                "events": [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                           for e in s.events],
                                "status": s.status.code})
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
    waits = [s for s in spans if s["name"].startswith("wait dependencies ")]  # if ``total`` was still pending
    spans = [s for s in spans if s not in waits]

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
    for w in waits:
        assert by_id[w["parent"]]["name"] == "call Calc.add"


SEMCONV_CLIENT = """
import sys
import nalar
c = nalar.connect(sys.argv[1], sys.argv[2], name="semconv-client")
print(c.stub("Planner").plan(2, 3).result(30))
try:
    c.stub("Planner").nested_fail().result(30)
except nalar.RemoteError as e:
    print("failed as expected:", e.type)
counter = c.stub("Counter").options(session="traced-s")
print(counter.incr().result(30), counter.incr(5).result(30))
gate = c.stub("Gate")
parked = gate.park(4)  # pending until released: the next call waits for it, here, before it is sent
added = c.stub("Calc").add(parked, 1)
gate.wait_started(1).result(30)
gate.release().result(30)
print("dep", added.result(30))
c.close()
"""


def _one(spans: list[dict[str, Any]], name: str, **where: Any) -> dict[str, Any]:
    got = [s for s in spans if s["name"] == name and all(s.get(k) == v for k, v in where.items())]
    assert len(got) == 1, (name, where, [(s["name"], s["service"]) for s in spans])
    return got[0]


def _exception(span: dict[str, Any]) -> dict[str, Any]:
    events = [a for n, a in span["events"] if n == "exception"]
    assert len(events) == 1, span
    return events[0]


def test_spans_follow_the_semantic_conventions(receiver: Receiver, start_node: Callable[..., Any],
                                               nats_url: str, namespace: str) -> None:
    """Messaging and RPC attributes, nalar's under ``nalar.``, exception events with the remote traceback,
    dependency waits, state commits with their version, and each process's own ``service.name``."""
    # The nodes' service environment names them; a client run in that same environment must not take
    # the name (NALAR_SERVICE_ROLE says whom OTEL_SERVICE_NAME is for); `nalar call` is nalar-cli.
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "svc-node", "NALAR_SERVICE_ROLE": "node"}
    node_a = start_node("sample_actors:Planner", "sample_actors:Counter", name="nodeA", env=otel)
    node_b = start_node("sample_actors:Calc", "sample_actors:Gate", name="nodeB", env=otel)

    run = subprocess.run([sys.executable, "-c", SEMCONV_CLIENT, nats_url, namespace],
                         env=node_env(otel), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "failed as expected: ValueError" in run.stdout and "1 6" in run.stdout and "dep 5" in run.stdout, run.stdout
    cli = subprocess.run([sys.executable, "-m", "nalar.cli.main", "call", "--nats", nats_url, "--namespace",
                          namespace, "Calc.where", "[]"], env=node_env(otel), capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    node_a.stop()
    node_b.stop()

    def done(spans: list[dict[str, Any]]) -> bool:
        names = [s["name"] for s in spans]
        return (names.count("state commit") >= 2 and "call Calc.fail" in names and "Calc.fail" in names
                and any(n.startswith("wait dependencies") for n in names)
                and sum(n == "call Calc.where" for n in names) >= 2)

    spans = receiver.wait(done)
    by_id = {s["id"]: s for s in spans}

    # -- service.name per process ----------------------------------------------------------------
    for s in spans:
        assert s["service"] in ("nalar-client", "nalar-cli", "svc-node"), s
    root = _one(spans, "call Planner.plan")
    assert root["service"] == "nalar-client" and root["node"] == "semconv-client"
    cli_call = _one(spans, "call Calc.where", service="nalar-cli")
    assert cli_call["parent"] == "" and cli_call["kind"] == CLIENT
    assert {s["service"] for s in spans if s["node"] in ("nodeA", "nodeB")} == {"svc-node"}

    # -- messaging and RPC conventions, both sides ---------------------------------------------------
    plan = _one(spans, "Planner.plan")
    assert plan["parent"] == root["id"] and plan["kind"] == SERVER
    for s, side in ((root, "client"), (plan, "server")):
        a = s["attrs"]
        assert a["messaging.system"] == "nats", (side, a)
        assert a["messaging.destination.name"] == f"nalar.{namespace}.call.Planner", (side, a)
        assert a["rpc.system"] == "nalar" and a["rpc.service"] == "Planner" and a["rpc.method"] == "plan"
        assert a["nalar.future_id"] == a["nalar.request_id"]  # a root call is its own request
        assert a["nalar.priority"] == 0 and isinstance(a["nalar.attempt"], int)
        assert not any(k.startswith(("future", "actor", "method")) for k in a)
    assert root["attrs"]["nalar.future_id"] == plan["attrs"]["nalar.future_id"]
    assert plan["attrs"]["nalar.node"] == "nodeA" and plan["attrs"]["nalar.instance"].startswith("Planner")
    child = next(s for s in spans if s["name"] == "Calc.add" and s["attrs"]["nalar.request_id"]
                 == plan["attrs"]["nalar.request_id"])
    assert child["attrs"]["nalar.parent_id"] == plan["attrs"]["nalar.future_id"]
    assert child["attrs"]["nalar.node"] == "nodeB"

    # -- queue spans -----------------------------------------------------------------------------------
    for q in (s for s in spans if s["name"] == "queue"):
        server = by_id[q["parent"]]
        assert q["attrs"]["nalar.instance"] == server["attrs"]["nalar.instance"], q
        assert q["attrs"]["nalar.queue.wait_ms"] >= 0 and q["attrs"]["nalar.node"] == server["attrs"]["nalar.node"]

    # -- a failed call: ERROR and an exception event with the remote traceback, on both sides ---------
    fail_server = _one(spans, "Calc.fail")
    fail_client = _one(spans, "call Calc.fail")
    assert fail_server["parent"] == fail_client["id"] and fail_client["node"] == "nodeA"
    for s in (fail_server, fail_client, _one(spans, "Planner.nested_fail"), _one(spans, "call Planner.nested_fail")):
        assert s["status"] == 2, s  # STATUS_CODE_ERROR
        e = _exception(s)
        assert e["exception.type"] == "ValueError" and e["exception.message"] == "deep failure", e
        assert "raise ValueError(message)" in e["exception.stacktrace"], e  # the executor's traceback
        assert s["attrs"]["error.type"] == "ValueError"
    assert "sample_actors.py" in _exception(_one(spans, "call Planner.nested_fail"))["exception.stacktrace"]

    # -- waits on dependencies: from the call's creation until it is sent -------------------------------
    waits = [s for s in spans if s["name"] == "wait dependencies Calc.add" and s["service"] == "nalar-client"]
    assert len(waits) == 1, [s["name"] for s in spans]
    w = waits[0]
    call = by_id[w["parent"]]
    assert call["name"] == "call Calc.add" and call["service"] == "nalar-client"
    assert w["attrs"]["nalar.dependencies"] == 1 and w["attrs"]["nalar.future_id"] == call["attrs"]["nalar.future_id"]

    # -- state commits, with the version each made --------------------------------------------------------
    commits = sorted((s for s in spans if s["name"] == "state commit"), key=lambda s: s["attrs"]["nalar.state.version"])
    assert [c["attrs"]["nalar.state.version"] for c in commits] == [1, 2]
    for c in commits:
        assert by_id[c["parent"]]["name"] == "Counter.incr"
        assert c["attrs"]["nalar.session"] == "traced-s" and c["attrs"]["nalar.state.outcome"] == "ok"
        assert c["attrs"]["nalar.state.changes"] >= 1
    assert commits[1]["attrs"].get("nalar.state.base_version") == 1


def test_tracing_off_without_endpoint(client: nalar.Client, start_node: Callable[..., Any]) -> None:
    start_node("sample_actors:Calc", name="plain")
    assert tracing.TRACER is None
    assert client.stub("Calc").add(1, 2).result(30) == 3
    assert tracing.TRACER is None


def test_a_request_at_the_gateway_is_one_trace_under_its_http_span(receiver: Receiver,
                                                                   start_node: Callable[..., Any],
                                                                   nats_url: str, namespace: str) -> None:
    """The gateway's SERVER span (continuing the HTTP client's ``traceparent``) is the parent of the call
    tree; the gateway reports its own service.name; a policy round that decided ops is a span with them."""
    import httpx

    from conftest import NodeProc, free_port

    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    start_node("sample_actors:Planner", name="nodeA", env=otel)
    start_node("sample_actors:Calc", name="nodeB", env=otel)
    port = free_port()
    procs = [NodeProc(["--port", str(port), "--nats", nats_url, "--namespace", namespace], node_env(otel),
                      cmd="gateway", marker="listening on"),
             NodeProc(["--nats", nats_url, "--namespace", namespace, "--interval", "0.2",
                       "--policies", "sample_policies:Prioritize"], node_env(otel), cmd="policy",
                      marker="policy actor ready")]
    try:
        for p in procs:
            p.wait_ready()
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/actors/Planner/plan", json=[2, 3], timeout=30,
                       headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Session-Id": "traced-session"})
        assert r.status_code == 200 and r.json()["result"]["value"] == 10, r.text
        spans = receiver.wait(lambda got: sum(s["name"] == "Calc.add" for s in got) >= 2
                              and any(s["name"] == "policy round" for s in got)
                              and any(s["name"].startswith("POST ") for s in got))
    finally:
        for p in procs:
            p.stop()
    http = _one(spans, "POST /v1/actors/{actor}/{method}")
    assert http["kind"] == SERVER and http["service"] == "nalar-gateway" and http["trace"] == trace_id
    assert http["parent"] == "00f067aa0ba902b7"  # the HTTP client's span
    a = http["attrs"]
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v1/actors/{actor}/{method}"
    assert a["url.path"] == "/v1/actors/Planner/plan" and a["http.response.status_code"] == 200
    assert a["nalar.session"] == "traced-session" and a["server.port"] == port
    root = _one(spans, "call Planner.plan")
    assert root["parent"] == http["id"] and root["service"] == "nalar-gateway" and root["kind"] == CLIENT
    tree = [s for s in spans if s["trace"] == trace_id]
    assert {s["name"] for s in tree} >= {"Planner.plan", "call Calc.add", "Calc.add", "call Calc.where", "Calc.where"}
    assert {s["service"] for s in tree} == {"nalar-gateway", "nalar-node"}

    rounds = [s for s in spans if s["name"] == "policy round"]
    # only rounds that decided something (the first: the instance counts, and Prioritize's two)
    rounds = [s for s in rounds if s["attrs"].get("nalar.policy.ops.priority")]
    assert len(rounds) == 1, rounds
    ra = rounds[0]["attrs"]
    assert rounds[0]["service"] == "nalar-policy" and rounds[0]["trace"] != trace_id
    kinds = {k: v for k, v in ra.items() if k.startswith("nalar.policy.ops.")}
    assert ra["nalar.policy.ops.priority"] == 2 and ra["nalar.policy.ops"] == sum(kinds.values()), ra
    assert ra["nalar.policy.nodes"] == 2 and ra["nalar.decisions.version"] >= 1 and "nalar.policy.term" in ra
