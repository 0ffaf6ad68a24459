"""`nalar gateway`: real node processes, the gateway as its own process on a loopback port, HTTP from
httpx and the official `openai` client.

One deployment serves the whole module (a node with the sample actors and a model on the simulated
engine, a second node whose queue holds one call, a gateway without and one with an API key): each
test uses its own session ids and gates.
"""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import NodeProc, free_port, node_env, wait_for

import nalar
from nalar.bus.errors import (BadRequest, BusError, Cancelled, Conflict, DeadlineExceeded, DependencyFailed,
                              Overloaded, PayloadTooLarge, RemoteError, StateError, Unavailable, UnknownActor,
                              UnknownMethod)
from nalar.cli.gateway import status_of

API_KEY = "sk-test-" + uuid.uuid4().hex



class Deployment:
    def __init__(self, url: str, ns: str, home: Path) -> None:
        self.url, self.ns = url, ns
        self.env = node_env({"NALAR_HOME": str(home), "NALAR_LLM": "sim"})
        self.env.pop("NALAR_NATS_URL", None)
        self.procs: list[NodeProc] = []

    def start(self, cmd: str, *args: str, marker: str = " ready on ", env: dict[str, str] | None = None) -> NodeProc:
        p = NodeProc([*args, "--nats", self.url, "--namespace", self.ns], {**self.env, **(env or {})}, cmd=cmd,
                     marker=marker)
        self.procs.append(p)
        p.wait_ready()
        return p

    def gateway(self, *args: str, env: dict[str, str] | None = None) -> str:
        port = free_port()
        self.start("gateway", "--port", str(port), *args, marker="listening on", env=env)
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def dep(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("gw")
    d = Deployment(nats_url, "t" + uuid.uuid4().hex[:10], home / "nalar-home")
    try:
        d.start("node", "nalar.workloads.demo:Notebook", "sample_actors:Calc", "sample_actors:Planner",
                "sample_actors:Gate", "sample_actors:Rough", "sample_sim:SimLLM=2", "sample_gateway:ParkingChat", "--name", "gw-a",
                "--grace", "1", "--state-dir", str(home / "state-a"))
        d.start("node", "sample_gateway:Narrow", "sample_gateway:NarrowCtl", "--max-queue", "1", "--name", "gw-b",
                "--grace", "1", "--state-dir", str(home / "state-b"))
        d.start("policy", "--interval", "0.25", "--name", "gw-policy", marker="policy actor ready")
        d.base = d.gateway("--model", "sim-chat=SimLLM")  # type: ignore[attr-defined]
        d.keyed = d.gateway(env={"NALAR_GATEWAY_API_KEY": API_KEY})  # type: ignore[attr-defined]
        yield d
    finally:
        for p in reversed(d.procs):
            p.stop()


@pytest.fixture
def http(dep: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dep.base, timeout=60) as c:  # type: ignore[attr-defined]
        yield c


@pytest.fixture
def nc(dep: Deployment) -> Iterator[nalar.Client]:
    c = nalar.connect(dep.url, dep.ns)
    yield c
    c.close()


# -- the actor endpoint ------------------------------------------------------------------------------
def test_a_stateful_call_round_trips_with_its_session_header(http: httpx.Client) -> None:
    me, you = "s-" + uuid.uuid4().hex, "s-" + uuid.uuid4().hex
    r = http.post("/v1/actors/Notebook/add", json=["buy milk"], headers={"X-Session-Id": me})
    assert r.status_code == 200 and r.json() == {"result": 1}, r.text
    assert http.post("/v1/actors/Notebook/add", json={"note": "call mum"},
                     headers={"X-Session-Id": me}).json() == {"result": 2}
    assert http.post("/v1/actors/Notebook/notes", headers={"X-Session-Id": me}).json() == \
        {"result": ["buy milk", "call mum"]}
    assert http.post("/v1/actors/Notebook/add", json="x", headers={"X-Session-Id": you}).json() == {"result": 1}
    # headers reach the call: the deadline and the session as the actor sees them
    got = http.post("/v1/actors/Calc/deadline", headers={"X-Timeout": "7"}).json()["result"]
    assert 0 < got - time.time() <= 7, got  # the absolute deadline the actor sees
    assert http.post("/v1/actors/Calc/session", headers={"X-Session-Id": me}).json() == {"result": me}
    assert http.post("/v1/actors/Calc/add", json=[2, 3], headers={"X-Priority": "5"}).json() == {"result": 5}


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["message"] and body["code"] == status, body
    return body  # type: ignore[no-any-return]


def test_each_error_class_maps_to_its_status(http: httpx.Client, nc: nalar.Client) -> None:
    # 400: malformed JSON, bad headers, arguments the method does not take, a ValueError it raised
    _error(http.post("/v1/actors/Calc/add", content=b"[1,", headers={"Content-Type": "application/json"}), 400)
    _error(http.post("/v1/actors/Calc/add", json=[1, 2], headers={"X-Priority": "high"}), 400)
    _error(http.post("/v1/actors/Calc/add", json=[1, 2], headers={"X-Timeout": "-1"}), 400)
    bad = _error(http.post("/v1/actors/Notebook/add", json=["x"], headers={"X-Session-Id": "s" * 2000}), 400)
    assert bad["kind"] == "bad_request" and "session" in bad["message"], bad  # a session id state cannot key
    raised = _error(http.post("/v1/actors/Calc/fail", json=["no such thing"]), 400)
    assert raised["type"] == "ValueError" and raised["message"] == "no such thing", raised
    # 404: no such actor, no such method (private ones included)
    assert _error(http.post("/v1/actors/NoSuchActor/x"), 404)["kind"] == "unknown_actor"
    assert _error(http.post("/v1/actors/Calc/nope"), 404)["kind"] == "unknown_method"
    _error(http.post("/v1/actors/Calc/_private"), 404)
    # 500: the structured error, with the remote traceback and the nested call's failure in the chain
    err = _error(http.post("/v1/actors/Planner/nested_fail"), 500)
    assert err["kind"] == "error" and err["actor"] == "Planner" and err["method"] == "nested_fail", err
    assert "Traceback" in err["traceback"] and err["chain"] and err["chain"][0]["actor"] == "Calc", err
    assert _error(http.post("/v1/actors/Rough/unprintable"), 500)["type"] == "_Unprintable"
    # 504: the deadline from X-Timeout passed
    late = _error(http.post("/v1/actors/Gate/park", json=[1], headers={"X-Timeout": "0.5"}), 504)
    assert late["kind"] == "deadline", late
    # 413: a body over the bound, refused before anything is sent
    big = b"[" + b'"' + b"x" * (9 << 20) + b'"]'
    assert _error(http.post("/v1/actors/Calc/add", content=big), 413)["kind"] == "payload_too_large"
    # 429 with Retry-After: Narrow runs one call at a time on a node that queues one
    gate = "g" + uuid.uuid4().hex
    narrow = nc.stub("Narrow", timeout=60)
    running = narrow.block(gate)
    wait_for(lambda: _running(nc, "Narrow") >= 1, what="Narrow running")
    queued = narrow.block(gate)
    wait_for(lambda: _queued(nc, "Narrow") >= 1, what="Narrow queued")
    try:
        r = http.post("/v1/actors/Narrow/block", json=[gate])
        assert _error(r, 429)["kind"] == "overloaded" and r.headers["Retry-After"] == "1"
    finally:
        nc.stub("NarrowCtl").release(gate).result(30)
    assert running.result(30) and queued.result(30)


def _actor_status(nc: nalar.Client, actor: str) -> dict[str, Any]:
    for n in nc.status(1.0):
        if actor in n.get("actors", {}):
            return n["actors"][actor]  # type: ignore[no-any-return]
    return {}


def _running(nc: nalar.Client, actor: str) -> int:
    return int(_actor_status(nc, actor).get("running", 0))


def _queued(nc: nalar.Client, actor: str) -> int:
    return int(_actor_status(nc, actor).get("queued", 0))


def test_each_failed_request_is_logged_once(dep: Deployment, http: httpx.Client) -> None:
    """The gateway's log (``nalar.calls``, as a node's): the route, status, call, error and request id."""
    gw = dep.procs[3]  # the gateway without an API key
    marker = "NoSuchActor" + uuid.uuid4().hex[:8]
    assert http.post(f"/v1/actors/{marker}/x").status_code == 404
    r = http.post("/v1/actors/Planner/nested_fail", json=[])
    line = wait_for(lambda: next((x for x in list(gw.output) if marker in x), None), what="the 404's log line")
    assert f"request failed: POST /v1/actors/{marker}/x 404 unknown_actor UnknownActor" in line, line
    assert sum(marker in x for x in gw.output) == 1
    assert r.status_code == 500, r.text  # a method that raised: its request id is the call's future id
    fid = r.json()["error"]["future_id"]
    logged = wait_for(lambda: next((x for x in list(gw.output) if f"request={fid}" in x), None),
                      what="the 500's log line")
    assert "request failed: POST /v1/actors/Planner/nested_fail 500 error" in logged, logged


def test_every_error_kind_has_its_status() -> None:
    """What cannot be provoked on cue here (an executor that never answers, a state log down) maps too."""
    cases = {UnknownActor("x"): 404, UnknownMethod("x"): 404, BadRequest("x"): 400, Overloaded("x"): 429,
             Unavailable("x"): 503, Cancelled("x"): 503, DeadlineExceeded("x"): 504, DependencyFailed("x"): 500,
             StateError("x"): 500, Conflict("x"): 500, RemoteError("RuntimeError", "x"): 500,
             RemoteError("ValueError", "x"): 400, PayloadTooLarge(10, 5): 413, BusError("x"): 503,
             ValueError("x"): 400}
    for e, status in cases.items():
        assert status_of(e)[0] == status, (e, status_of(e))
    assert status_of(Overloaded("x"))[1] == {"Retry-After": "1"} == status_of(Unavailable("x"))[1]


def test_a_client_that_disconnects_cancels_its_call(dep: Deployment, nc: nalar.Client) -> None:
    parking = nc.stub("ParkingChat", timeout=60)
    before = parking.stats().result(30)

    def park() -> None:
        try:
            httpx.post(f"{dep.base}/v1/actors/ParkingChat/generate", json=["x"], timeout=3)  # type: ignore[attr-defined]
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    t = threading.Thread(target=park)
    t.start()
    wait_for(lambda: parking.stats().result(30)["started"] > before["started"], what="the call to start")
    t.join(30)
    after = wait_for(lambda: (s := parking.stats().result(30))["cancelled"] > before["cancelled"] and s,
                     what="the parked call to be cancelled")
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)


# -- the API key -------------------------------------------------------------------------------------
def test_an_api_key_is_enforced_when_set(dep: Deployment) -> None:
    url = dep.keyed  # type: ignore[attr-defined]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{url}/v1/actors/Calc/add", json=[1, 2], headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    ok = httpx.post(f"{url}/v1/actors/Calc/add", json=[1, 2], headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json() == {"result": 3}, ok.text
    # the gateway without one answers anyone
    assert httpx.post(f"{dep.base}/v1/actors/Calc/add", json=[1, 2]).json() == {"result": 3}  # type: ignore[attr-defined]


# -- OpenAI-compatible -----------------------------------------------------------------------------------
def test_the_openai_client_gets_completions_from_a_simulated_model(dep: Deployment) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{dep.base}/v1", api_key="unused", max_retries=0)  # type: ignore[attr-defined]
    ids = [m.id for m in oa.models.list().data]
    assert "SimLLM" in ids and "sim-chat" in ids, ids  # by kind, and as --model named it

    chat = oa.chat.completions.create(model="sim-chat", messages=[{"role": "user", "content": "hello there"}],
                                      max_tokens=8, user="u-" + uuid.uuid4().hex)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.usage and 1 <= chat.usage.completion_tokens <= 8, chat
    assert chat.choices[0].finish_reason == "length" and chat.system_fingerprint == "simulated:llama3-8b-a100"

    comp = oa.completions.create(model="SimLLM", prompt="Once upon a time", max_tokens=5)
    assert comp.object == "text_completion" and comp.choices[0].text and comp.usage is not None, comp
    assert 1 <= comp.usage.completion_tokens <= 5, comp

    chunks = list(oa.chat.completions.create(model="SimLLM", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant", chunks
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage and 1 <= chunks[-1].usage.completion_tokens <= 12

    streamed = "".join(c.choices[0].text for c in oa.completions.create(model="SimLLM", prompt="abc", max_tokens=4,
                                                                        stream=True))
    assert streamed, streamed

    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # streamed: known before the stream starts
        list(oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}],
                                        stream=True))
    with pytest.raises(openai.BadRequestError):  # and so is a parameter the engine refuses
        list(oa.completions.create(model="SimLLM", prompt="x", max_tokens=5, temperature=9, stream=True))
    with pytest.raises(openai.BadRequestError):  # a sampling parameter the model refuses
        oa.completions.create(model="SimLLM", prompt="x", max_tokens=5, temperature=9)


def test_two_turns_of_one_session_land_on_the_same_instance(dep: Deployment, nc: nalar.Client) -> None:
    """Each second turn (its session from ``user`` this time) goes back to its first's instance, of
    SimLLM's two, and finds its prefix cached: the policy actor's cache affinity, reached through the
    gateway's session."""
    import concurrent.futures

    sessions = ["chat-" + uuid.uuid4().hex for _ in range(8)]
    history = {s: [{"role": "user", "content": f"{s}: tell me about the sea " * 20}] for s in sessions}

    def turn(s: str, second: bool) -> dict[str, Any]:
        body = {"model": "SimLLM", "messages": history[s], "max_tokens": 64}
        if second:
            body["user"] = s
        r = httpx.post(f"{dep.base}/v1/chat/completions", json=body, timeout=60,  # type: ignore[attr-defined]
                       headers={} if second else {"X-Session-Id": s})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = dict(zip(sessions, pool.map(lambda s: turn(s, False), sessions)))
        for s in sessions:
            history[s] += [first[s]["choices"][0]["message"], {"role": "user", "content": "and the mountains?"}]
        rounds = nc.policy_status()["rounds"]  # type: ignore[index]
        wait_for(lambda: nc.policy_status()["rounds"] >= rounds + 2, what="two control rounds")  # type: ignore[index]
        second = dict(zip(sessions, pool.map(lambda s: turn(s, True), sessions)))
    for s in sessions:
        assert second[s]["nalar"]["instance"] == first[s]["nalar"]["instance"], (first[s], second[s])
        assert second[s]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, second[s]


def test_openai_requests_that_are_malformed_are_400(http: httpx.Client) -> None:
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)
    _error(http.post("/v1/chat/completions", json={"model": "SimLLM", "messages": "hi"}), 400)
    _error(http.post("/v1/chat/completions", json={"model": "SimLLM", "n": 2,
                                                   "messages": [{"role": "user", "content": "x"}]}), 400)
    _error(http.post("/v1/completions", json={"model": "SimLLM", "prompt": ["a", "b"]}), 400)
    _error(http.post("/v1/completions", content=b"{"), 400)


def test_a_stream_the_client_leaves_cancels_the_call(dep: Deployment, nc: nalar.Client) -> None:
    """ParkingChat stands in for a long generation: the stream has started (its first event read) when
    the client goes, and the call is cancelled where it runs."""
    parking = nc.stub("ParkingChat", timeout=60)
    before = parking.stats().result(30)
    with httpx.Client(base_url=dep.base, timeout=30) as c:  # type: ignore[attr-defined]
        with c.stream("POST", "/v1/chat/completions", json={"model": "ParkingChat", "stream": True,
                                                           "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()  # held: a discarded iterator closes the response, and the connection
            first = next(lines)
            assert first.startswith("data: ") and '"role":"assistant"' in first, first
            wait_for(lambda: parking.stats().result(30)["started"] > before["started"], what="the call to start")
    after = wait_for(lambda: (s := parking.stats().result(30))["cancelled"] > before["cancelled"] and s,
                     what="the streamed call to be cancelled")
    assert after["cancelled"] == before["cancelled"] + 1, (before, after)
    assert httpx.get(f"{dep.base}/v1/models").status_code == 200  # type: ignore[attr-defined]


def test_a_stream_comes_token_by_token_and_a_client_that_leaves_aborts_the_engine(dep: Deployment,
                                                                                 nc: nalar.Client) -> None:
    """SimLLM's streaming method: the pieces arrive as the engine makes them, and a client gone
    mid-stream has its request dropped by the engine (its ``aborted`` count), not run to the end."""
    with httpx.Client(base_url=dep.base, timeout=60) as c:  # type: ignore[attr-defined]
        with c.stream("POST", "/v1/completions", json={"model": "SimLLM", "prompt": "p", "stream": True,
                                                      "max_tokens": 64, "ignore_eos": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        texts = [e for e in events if '"text":"' in e and '"text":""' not in e]
        assert len(texts) > 2, events  # many pieces, not one completion cut up at the end
        llm = nc.stub("SimLLM")

        def aborted() -> int:
            return sum(s.get("aborted", 0) for s in _engine_stats(nc, "SimLLM").values())

        before = aborted()
        with c.stream("POST", "/v1/completions", json={"model": "SimLLM", "prompt": "p", "stream": True,
                                                      "max_tokens": 8000, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held until the client leaves, at the end of the block
            assert next(line for line in lines if '"text":"' in line)  # it is generating
    wait_for(lambda: aborted() > before, what="the engine to drop the request of the client that left")
    assert all(s["running"] == 0 for s in _engine_stats(nc, "SimLLM").values()), _engine_stats(nc, "SimLLM")
    assert llm.generate("after", max_tokens=3).result(30)["completion_tokens"] >= 1


def _engine_stats(nc: nalar.Client, actor: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in nc.status(5.0):
        out.update((n.get("actors", {}).get(actor) or {}).get("engine") or {})
    return out


# -- the command -------------------------------------------------------------------------------------
def test_the_command_refuses_bad_options_and_an_unreachable_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nalar.cli.main", "gateway", *args], capture_output=True,
                              text=True, timeout=60, env=node_env({"NALAR_HOME": str(tmp_path)}))

    r = gateway("--model", "no-equals-sign", "--nats", "nats://127.0.0.1:1")
    assert r.returncode == 2 and r.stderr.startswith("nalar: --model") and "Traceback" not in r.stderr, r.stderr
    r = gateway("--port", "0")
    assert r.returncode == 2 and "port" in r.stderr, r.stderr
    r = gateway("--nats", "nats://127.0.0.1:1", "--port", str(free_port()))
    assert r.returncode == 3 and r.stderr.startswith("nalar: ") and "Traceback" not in r.stderr, r.stderr


def test_stream_options_must_be_an_object(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "SimLLM", "prompt": "p", "stream": True, "stream_options": True})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"], r.text


def test_a_session_id_with_control_characters_is_refused(http: httpx.Client, nc: nalar.Client) -> None:
    """Session ids are shown on operators' terminals: an escape sequence in one is a 400, not a session."""
    r = http.post("/v1/completions", json={"model": "SimLLM", "prompt": "p", "max_tokens": 2,
                                           "user": "\x1b]52;c;cHduZWQ=\x07"})
    assert r.status_code == 400 and "control character" in r.json()["error"]["message"], r.text
    with pytest.raises(ValueError, match="control character"):
        nc.stub("Calc", session="tab\there").add(1, 2)


def test_the_actor_endpoint_streams_a_streaming_method_as_events(dep: Deployment, http: httpx.Client) -> None:
    """``Accept: text/event-stream``: each item of SimLLM's generate_stream as an event, then the result
    (the count); a plain method is one result event."""
    with http.stream("POST", "/v1/actors/SimLLM/generate_stream", json={"prompt": "p", "max_tokens": 6,
                                                                        "ignore_eos": True},
                     headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        import json

        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    items = [e["item"] for e in events if "item" in e]
    assert len(items) >= 2 and isinstance(items[-1], dict) and items[-1]["completion_tokens"] == 6, events
    assert events[-1] == {"result": len(items)}, events
    with http.stream("POST", "/v1/actors/Calc/add", json=[1, 2], headers={"Accept": "text/event-stream"}) as r:
        assert [line for line in r.iter_lines() if line] == ['data: {"result":3}']
