"""Prometheus metrics: the histogram, and a real deployment scraped by a real Prometheus server.

The deployment is ``nalar up`` with authentication on (node and policy actor on one port, its gateway
on its own), plus a second ``nalar node`` (metrics from ``$NALAR_METRICS_PORT``) and a standby
``nalar policy`` (``--metrics-port``): four targets, every one on loopback.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import nalar
from conftest import NodeProc, free_port, node_env, wait_for
from nalar.actors.histogram import Histogram, quantile

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
README = Path(__file__).resolve().parents[1] / "README.md"


# -- the histogram ------------------------------------------------------------------------------------
def test_histogram_quantiles_interpolate_inside_a_bucket() -> None:
    h = Histogram(bounds=(1.0, 2.0, 5.0, 10.0), now=0.0)
    for ms in [0.5] * 50 + [1.5] * 40 + [7.0] * 9 + [50.0]:
        h.observe(ms, 0.1)
    r = h.recent(0.2)
    assert r.n == 100 and h.total == 100
    assert r.p50 == 1.0  # the 50th of 100 is the last of the first bucket (0, 1]
    assert r.p99 == 10.0  # the 99th: the top of (5, 10], where the 9 sevens are
    assert quantile(h.bounds, h.counts, 0.25) == 0.5  # halfway into (0, 1]
    assert quantile(h.bounds, h.counts, 1.0) == 10.0  # in +Inf: the largest bound
    assert quantile(h.bounds, [0] * 5, 0.5) is None
    assert h.cumulative() == [(1.0, 50), (2.0, 90), (5.0, 90), (10.0, 99), (float("inf"), 100)]
    assert h.sum == pytest.approx(0.5 * 50 + 1.5 * 40 + 7.0 * 9 + 50.0)
    assert Histogram(now=0.0).recent(1.0).to_dict() == {"p50": None, "p99": None, "n": 0, "window_s": 1.0}


def test_histogram_window_rotates_and_forgets() -> None:
    h = Histogram(bounds=(1.0, 10.0), period=5.0, now=0.0)
    h.observe(8.0, 1.0)
    assert h.recent(4.0) == (5.5, 9.91, 1, 4.0)  # p50 and p99 interpolated in (1, 10]
    assert h.recent(6.0).n == 1 and h.recent(6.0).window_s == 6.0  # in the previous window now
    h.observe(0.5, 7.0)
    r = h.recent(9.0)
    assert r.n == 2 and r.window_s == 9.0
    r = h.recent(11.0)  # the first went out with its window; the second is in the previous one
    assert (r.n, r.p50, r.window_s) == (1, 0.5, 6.0)
    assert h.recent(30.0).n == 0  # a long idle empties both
    assert h.total == 2  # the all-time counts keep everything
    h.observe(3.0, 31.0)
    assert h.recent(31.0).n == 1 and h.cur_start == 30.0


# -- a deployment --------------------------------------------------------------------------------------
class Deployment:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.procs: list[NodeProc] = []
        self.targets: dict[str, list[str]] = {}  # Prometheus job -> host:port
        self.gateway = ""
        self.status: list[dict[str, Any]] = []  # the nodes' status while calls queued at Held


def _metrics_line(lines: list[str]) -> str:
    (url,) = [w for line in lines for w in line.split() if w.startswith("http://") and w.endswith("/metrics")][:1]
    return url.removeprefix("http://").removesuffix("/metrics")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("metrics"))
    env = node_env({"NALAR_HOME": str(d.home)})
    for k in ("NALAR_NATS_URL", "NALAR_METRICS_PORT", "NALAR_METRICS_ADDR"):
        env.pop(k, None)
    gw_port, node_port, policy_port = free_port(), free_port(), free_port()
    before = os.environ.get("NALAR_HOME")
    os.environ["NALAR_HOME"] = str(d.home)  # this process's clients find `nalar up` and its credentials
    try:
        up = NodeProc(["sample_metrics:Held", "sample_metrics:Door", "sample_actors:Calc", "sample_actors:Counter",
                       "--port", str(free_port()), "--gateway-port", str(gw_port), "--metrics-port",
                       str(free_port()), "--interval", "0.5"], env, "up", "Ctrl-C stops everything")
        d.procs.append(up)
        up.wait_ready()
        d.targets["nalar-node"] = [_metrics_line(up.output)]  # its node, and the policy actor that leads
        d.gateway = f"127.0.0.1:{gw_port}"
        d.targets["nalar-gateway"] = [d.gateway]
        extra = NodeProc(["sample_actors:Calc", "--name", "extra"], dict(env, NALAR_METRICS_PORT=str(node_port)))
        standby = NodeProc(["--name", "standby", "--policies", "none", "--metrics-port", str(policy_port)], env,
                           "policy", "policy actor ready")
        d.procs += [extra, standby]
        extra.wait_ready()
        standby.wait_ready()
        d.targets["nalar-node"].append(f"127.0.0.1:{node_port}")
        d.targets["nalar-policy"] = [f"127.0.0.1:{policy_port}"]
        _drive(d)
        yield d
    finally:
        for p in reversed(d.procs):
            p.stop()
        if before is None:
            os.environ.pop("NALAR_HOME", None)
        else:
            os.environ["NALAR_HOME"] = before


def _drive(d: Deployment) -> None:
    """Calls of every kind: ok, failing, stateful, queued behind one another, and over HTTP."""
    with nalar.connect() as c:
        calc = c.stub("Calc")
        assert [f.result(30) for f in [calc.add(i, 1) for i in range(20)]] == [i + 1 for i in range(20)]
        with pytest.raises(nalar.RemoteError, match="boom"):
            calc.fail("boom").result(30)
        counter = c.stub("Counter").options(session="s1")
        assert [counter.incr().result(30) for _ in range(3)] == [1, 2, 3]
        held = [c.stub("Held").options(session=f"w{i}").wait(i) for i in range(3)]  # one runs, two wait in line
        with nalar.connect(role="operator") as op:
            def queued() -> list[dict[str, Any]] | None:
                nodes = op.status()
                up = [n for n in nodes if "Held" in n["actors"]]
                return nodes if up and len(up[0]["actors"]["Held"]["waiting"]) == 2 else None
            d.status = wait_for(queued, what="two calls waiting at Held")
        assert c.stub("Door").open().result(30) is True
        assert [f.result(30) for f in held] == [0, 1, 2]
    r = httpx.post(f"http://{d.gateway}/v1/actors/Calc/add", json=[2, 3], timeout=30)
    assert r.status_code == 200 and r.json() == {"result": 5}, r.text
    r = httpx.post(f"http://{d.gateway}/v1/actors/Calc/nope", json=[], timeout=30)
    assert r.status_code == 404, r.text


def _scrape(target: str) -> dict[str, Any]:
    r = httpx.get(f"http://{target}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (a sample name: ``x_total``, ``x_bucket``) with these labels."""
    return sum(s.value for f in families.values() for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_status_reports_recent_latency_and_the_sessions_in_line(deployment: Deployment) -> None:
    (up,) = [n for n in deployment.status if "Held" in n["actors"]]
    held = up["actors"]["Held"]
    assert [w["session"] for w in held["waiting"]] == ["w1", "w2"]  # first in line first
    assert all(isinstance(w["wait_ms"], float) and w["wait_ms"] >= 0 for w in held["waiting"])
    calc = up["actors"]["Calc"]
    for key in ("latency_ms", "wait_ms"):
        s = calc[key]
        assert set(s) == {"p50", "p99", "n", "window_s"}, s
        assert isinstance(s["window_s"], float) and 0 < s["window_s"] <= 10.0
    lat = calc["latency_ms"]
    if lat["n"]:  # the queue group may have sent every Calc call to the other node
        assert 0 <= lat["p50"] <= lat["p99"]
    assert held["wait_ms"]["n"] == 1 and held["latency_ms"]["n"] == 0  # w0 runs; w1 and w2 still wait


def test_every_metrics_page_parses_with_the_expected_families(deployment: Deployment) -> None:
    up_target, extra_target = deployment.targets["nalar-node"]
    up, extra = _scrape(up_target), _scrape(extra_target)
    both = {**{f"up:{k}": v for k, v in up.items()}, **{f"extra:{k}": v for k, v in extra.items()}}
    assert _value(both, "nalar_calls_total", actor="Calc", outcome="ok") >= 21  # 20 + the gateway's
    errors = _value(both, "nalar_call_errors_total", actor="Calc", kind="error", type="ValueError")
    assert errors == 1  # (a local: pytest's rewrite of an assert on a call with type=... went wrong here)
    assert _value(both, "nalar_call_errors_total", actor="Calc", kind="unknown_method") == 1
    assert _value(up, "nalar_state_commits_total") >= 3
    assert _value(up, "nalar_call_run_seconds_count", actor="Held") == 3
    assert _value(up, "nalar_call_queue_wait_seconds_bucket", actor="Held", le="+Inf") == 3
    assert _value(up, "nalar_actor_queued", actor="Held") == 0
    assert _value(up, "nalar_instance_handled_total", actor="Counter") == 3
    assert "nalar_decisions_version" in extra and "nalar_policy_rounds" not in extra
    assert "process_cpu_seconds" in up
    # one of the two policy actors leads (the lease may change hands while both start), and rounds run
    policies = [up_target, deployment.targets["nalar-policy"][0]]

    def one_leads_and_decides() -> bool:
        pages = [_scrape(t) for t in policies]
        leads = [p for p in pages if _value(p, "nalar_policy_leader", role="leader") == 1]
        return len(leads) == 1 and _value(leads[0], "nalar_policy_rounds_total") >= 1
    wait_for(one_leads_and_decides, what="one policy actor leading and running rounds")
    standby = _scrape(deployment.targets["nalar-policy"][0])
    assert "nalar_policy_term" in standby and "nalar_actor_queued" not in standby
    gw = _scrape(deployment.gateway)
    route = "/v1/actors/{actor}/{method}"
    assert _value(gw, "nalar_gateway_http_requests_total", route=route, status="200", method="POST") == 1
    assert _value(gw, "nalar_gateway_http_requests_total", route=route, status="404") == 1
    assert _value(gw, "nalar_gateway_http_request_duration_seconds_count", route=route) == 2
    assert _value(gw, "nalar_gateway_http_requests_in_flight") == 1  # this scrape


def test_a_real_prometheus_server_scrapes_every_target(deployment: Deployment, tmp_path: Path) -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("no prometheus binary (Debian's package: apt-get install prometheus)")
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: {targets!r}\n"
                   for job, targets in deployment.targets.items())
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n{jobs}")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = f"http://127.0.0.1:{port}/api/v1"

    def targets_up() -> list[dict[str, Any]] | None:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            r = httpx.get(f"{api}/targets", timeout=2)
        except httpx.TransportError:
            return None  # not listening yet
        if r.status_code != 200:
            return None  # starting: 503 until its storage is open
        active = r.json()["data"]["activeTargets"]
        return active if len(active) == 4 and all(t["health"] == "up" for t in active) else None

    def query(expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        active = wait_for(targets_up, timeout=30, what="every target up in Prometheus")
        assert {t["labels"]["job"] for t in active} == {"nalar-node", "nalar-policy", "nalar-gateway"}
        checks = {
            'sum(nalar_calls_total{actor="Calc",outcome="ok"})': lambda v: v >= 21,
            'sum(nalar_call_errors_total{actor="Calc",type="ValueError"})': lambda v: v == 1,
            "sum(nalar_state_commits_total)": lambda v: v >= 3,
            'histogram_quantile(0.99, sum by (le) (nalar_call_run_seconds_bucket{actor="Held"}))': lambda v: v > 0,
            'sum(nalar_call_queue_wait_seconds_count{actor="Held"})': lambda v: v == 3,
            "sum(nalar_policy_leader)": lambda v: v == 1,  # one leader, one standby
            "max(nalar_policy_rounds_total)": lambda v: v >= 1,
            'sum(nalar_gateway_http_requests_total{status="200",route="/v1/actors/{actor}/{method}"})':
                lambda v: v >= 1,
            "count(nalar_instance_running)": lambda v: v >= 5,
            'count(up{job=~"nalar-.*"} == 1)': lambda v: v == 4,
        }
        for expr, ok in checks.items():  # (a value may lag by a scrape: each is polled, bounded)
            def holds() -> bool:
                got = query(expr)
                return bool(got) and ok(float(got[0]["value"][1]))
            wait_for(holds, timeout=15, what=f"{expr} as expected")

        # the README's query: a rate needs calls while Prometheus scrapes, so calls go on until it has one
        (readme_expr,) = re.findall(r"^```promql\n(.*?)\n```", README.read_text(), re.S | re.M)

        def calls_show_in_the_readme_query() -> bool:
            for i in range(5):
                httpx.post(f"http://{deployment.gateway}/v1/actors/Calc/add", json=[i, 1], timeout=30).raise_for_status()
            return any(r["metric"].get("actor") == "Calc" and float(r["value"][1]) > 0 for r in query(readme_expr))
        wait_for(calls_show_in_the_readme_query, timeout=20, what=f"a value of {readme_expr}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """The compose profile's config (cli/deploy/prometheus.yml) is one Prometheus accepts."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(promtool, os.X_OK):
        pytest.skip("no promtool (Debian's prometheus package)")
    cfg = Path(__file__).resolve().parents[1] / "cli" / "deploy" / "prometheus.yml"
    r = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_idle_connections_past_the_cap_are_closed_and_scrapes_still_answer() -> None:
    """A client holding connections open (each waits up to the read timeout) cannot take the process's
    descriptors: past ``MAX_CONNECTIONS`` a new one is closed at once; once they go, a scrape answers."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from nalar.actors.prometheus import MAX_CONNECTIONS, MetricsServer

    server = await MetricsServer(CollectorRegistry(), "127.0.0.1", 0).start()
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
        await _until(lambda: server.open == MAX_CONNECTIONS)  # the server has taken them all in
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once, without an answer
        writer.close()
        assert server.refused == 1
        for _, w in idle:
            w.close()
        await _until(lambda: server.open == 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await server.stop()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll real state until it holds (bounded)."""
    import asyncio
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)
