"""The reference workloads (analyst, router, swe): their tools and load generators without NATS, then
one or two sessions of each end to end on a real nats-server and real node processes serving the
workload's own node specs, with the simulated engine running 50x faster than real time."""
from __future__ import annotations

import asyncio
import random
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest

import nalar
from nalar.workloads import analyst, router, swe, tools
from nalar.workloads.spec import WorkloadSpec

FAST = {"NALAR_LLM_ARGS": '{"speed": 50}'}
WORKLOADS = (analyst.WORKLOAD, router.WORKLOAD, swe.WORKLOAD)
#: What the simulated engine answers (filler words): control flow must fall back to labels and specs.
SIM_TEXT = "the and for are but not you all any can had her was one our out day get has him his how "


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- tools ---------------------------------------------------------------------------------------------

def test_web_search_ranks_the_matching_page_first() -> None:
    ws = tools.WebSearch()
    assert run(ws.search("encode short link codes in base62", 3))[0]["id"] == "web-001"
    assert run(ws.search("url shortener features analytics", 3))[0]["id"] == "web-000"
    assert run(ws.search("token bucket rate limiting algorithm"))[0]["title"].startswith("Rate limiting algorithms")
    hits = run(ws.search("splitting group expenses between friends", 5))
    assert hits[0]["url"].endswith("/expense-splitting")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert run(ws.search("zzzz qqqq")) == []


def test_doc_retrieval_returns_passages() -> None:
    dr = tools.DocRetrieval()
    top = run(dr.retrieve("avoid SQL injection with sqlite3 placeholders", 3))
    assert len(top) == 3
    assert (top[0]["source"], top[0]["heading"]) == ("python_sqlite3.md", "Placeholders and SQL injection")
    assert "?" in top[0]["text"] and top[0]["title"].startswith("sqlite3")
    assert run(dr.retrieve("cancel an asyncio task after a timeout", 1))[0]["heading"] == "Timeouts"
    assert run(dr.retrieve("running total with a window function", 1))[0]["source"] == "sql_queries.md"
    passages, _ = tools.doc_passages()
    assert len(passages) >= 40 and all(p["text"] for p in passages)


def test_market_data() -> None:
    md = tools.MarketData()
    assert run(md.tickers("How does Northwind compare with QNT and Helix Therapeutics?")) == ["NWE", "QNT", "HLX"]
    assert run(md.tickers("nothing here")) == []
    f = run(md.fundamentals("nwe"))
    assert f["revenue_musd"] == {"2021": 21400, "2022": 29800, "2023": 26100}
    assert f["revenue_growth_pct"]["2021-2022"] == round(100 * 8400 / 21400, 2)
    assert f["net_debt_musd"] == 9800 - 2100
    q = run(md.quote("HLX"))
    assert q["price"] == 112.40 and q["week52_low"] < q["price"] < q["week52_high"]
    y = run(md.yields(["BBB"]))
    assert y["corporate_yield_10y_pct"] == {"BBB": round(4.20 + 1.24, 2)}
    assert run(md.research("utility regulated dividends interest rates", 1))[0]["sector"] == "utilities"
    news = run(md.news("Volt Motors", 3))
    assert len(news) == 3 and all(n["ticker"] == "VLT" for n in news)
    with pytest.raises(KeyError):
        run(md.quote("NOPE"))


def test_corpora_are_small_and_installed_as_package_data() -> None:
    files = [p for p in tools.CORPORA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300_000
    pyproject = tomllib.loads((Path(tools.__file__).resolve().parent.parent / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["nalar.workloads"]
    assert {"corpora/*", "corpora/docs/*"} <= set(data)


# -- control flow and load generators -------------------------------------------------------------------

def test_model_output_parsers_and_simulated_filler() -> None:
    assert router.parse_label(" Code.") == "code" and router.parse_label("chat: yes") == "chat"
    assert router.parse_label(SIM_TEXT) is None and router.parse_label("") is None
    assert swe.parse_verdict("PASS - looks good") == "PASS" and swe.parse_verdict(SIM_TEXT) is None
    assert swe.parse_split("SPLIT: storage; api", "t1") == [
        {"name": "storage", "path": "t1/0", "subtasks": []}, {"name": "api", "path": "t1/1", "subtasks": []}]
    assert swe.parse_split("DIRECT, it is small", "t1") == [] and swe.parse_split(SIM_TEXT, "t1") is None
    assert swe.parse_tasks("design...\nTASK: a\nTASK: b\n") == [
        {"name": "a", "path": "t0", "subtasks": []}, {"name": "b", "path": "t1", "subtasks": []}]
    assert swe.parse_tasks(SIM_TEXT) == []
    draws = [swe.review_draw(7, f"t{i}", 0, 0.3) for i in range(400)]
    assert draws == [swe.review_draw(7, f"t{i}", 0, 0.3) for i in range(400)]
    assert 0.2 < draws.count("FAIL") / len(draws) < 0.4


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_sessions_are_deterministic_json_and_well_formed(w: WorkloadSpec) -> None:
    a = list(w.sessions(random.Random(3), 5.0, 40.0))
    b = list(w.sessions(random.Random(3), 5.0, 40.0))
    assert a == b and 100 < len(a) < 300
    assert [t for t, _ in a] == sorted(t for t, _ in a) and a[-1][0] < 40.0
    assert len({s.id for _, s in a}) == len(a)
    for _, s in a:
        orjson.dumps([t.args for t in s.turns])  # JSON only
        assert s.turns[0].think_s == 0.0
    assert w.entry.split(".")[0] in {spec.split(":")[1].split("=")[0] for spec in w.nodes[0]}
    assert len(w.nodes) == 2 and w.policies


def test_analyst_sessions_have_follow_ups_with_think_time() -> None:
    ss = [s for _, s in analyst.sessions(random.Random(1), 10.0, 100.0)]
    turns = [len(s.turns) for s in ss]
    assert min(turns) == 1 and max(turns) <= analyst.MAX_TURNS
    assert 2.3 < sum(turns) / len(turns) < 3.5
    thinks = [t.think_s for s in ss for t in s.turns[1:]]
    assert all(0 < x <= analyst.THINK_MAX_S for x in thinks) and 6 < sum(thinks) / len(thinks) < 14
    assert all(tools.find_tickers(s.turns[0].args[0]) for s in ss)  # every first question names a company


def test_router_skew(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = [s.turns[0].args[1] for _, s in router.sessions(random.Random(2), 50.0, 40.0)]
    assert labels.count("chat") / len(labels) >= 0.88 and "code" in labels
    assert all(len(s.turns) == 1 for _, s in router.sessions(random.Random(2), 5.0, 10.0))
    monkeypatch.setenv("NALAR_ROUTER_SKEW", "0.05")
    labels = [s.turns[0].args[1] for _, s in router.sessions(random.Random(2), 50.0, 40.0)]
    assert labels.count("code") / len(labels) >= 0.92
    monkeypatch.setenv("NALAR_ROUTER_SKEW", "lots")
    with pytest.raises(ValueError, match="NALAR_ROUTER_SKEW"):
        next(router.sessions(random.Random(2), 5.0, 10.0))


def test_swe_projects() -> None:
    projects = [s.turns[0].args[0] for _, s in swe.sessions(random.Random(4), 10.0, 30.0)]

    def depth(t: dict[str, Any]) -> int:
        return max((1 + depth(s) for s in t["subtasks"]), default=0)

    assert all(swe.MIN_TASKS <= len(p["tasks"]) <= swe.MAX_TASKS for p in projects)
    depths = [depth(t) for p in projects for t in p["tasks"]]
    assert max(depths) == swe.MAX_DEPTH and depths.count(0) > len(depths) / 2


# -- end to end ------------------------------------------------------------------------------------------

def serve(start_node: Any, w: WorkloadSpec) -> None:
    for i, specs in enumerate(w.nodes):
        start_node(*specs, name=f"{w.name}{i}", env=FAST)


def test_analyst_follow_up_sees_the_earlier_turn(start_node: Any, client: nalar.Client) -> None:
    serve(start_node, analyst.WORKLOAD)
    q1 = "What was the percentage change in Northwind Energy's revenue from 2021 to 2023?"
    s1 = client.stub("Analyst").options(session="investor-1", timeout=60)
    other = client.stub("Analyst").options(session="investor-2", timeout=60).ask("Is Volt Motors expensive?")
    r1 = s1.ask(q1).result(60)
    assert r1["turn"] == 1 and r1["prior_questions"] == [] and r1["tickers"] == ["NWE"]
    assert r1["llm_calls"] == 5 and {r["agent"] for r in r1["reports"]} == {"stock", "bond", "research", "news"}
    assert all(r["llm"]["completion_tokens"] == analyst.SPECIALIST_TOKENS for r in r1["reports"])
    assert r1["summary"]["completion_tokens"] == analyst.SUMMARY_TOKENS
    assert r1["summary"]["instance"].startswith("AnalystLLM-")
    r2 = s1.ask("How does that compare with Helix Therapeutics?").result(60)
    # State persisted: the follow-up knows the first question and the company it was about, and its
    # summary prompt carries the whole conversation (so it is longer by at least turn 1's answer).
    assert r2["turn"] == 2 and r2["prior_questions"] == [q1] and r2["tickers"] == ["HLX", "NWE"]
    assert r2["summary"]["prompt_tokens"] > r1["summary"]["prompt_tokens"] + analyst.SUMMARY_TOKENS
    o = other.result(60)
    assert o["turn"] == 1 and o["prior_questions"] == [] and o["tickers"] == ["VLT"]


def test_router_takes_the_labelled_branch(start_node: Any, client: nalar.Client) -> None:
    serve(start_node, router.WORKLOAD)
    stub = client.stub("Router")
    chat = stub.options(session="req-1", timeout=60).route("Give me three ideas for a cheap weekend trip.", "chat")
    code = stub.options(session="req-2", timeout=60).route(
        "How do I avoid SQL injection when inserting orders into sqlite3 from Python?", "code")
    c, k = chat.result(60), code.result(60)
    # Simulated models answer filler, so the request's label decides (and the result says so).
    assert (c["branch"], c["label"], c["decided_by"]) == ("chat", "chat", "label")
    assert (k["branch"], k["label"], k["decided_by"]) == ("code", "code", "label")
    assert c["session"] == "req-1" and k["session"] == "req-2"
    assert c["classifier"]["completion_tokens"] == router.CLASSIFY_TOKENS
    assert c["classifier"]["instance"].startswith("ClassifierLLM-")
    assert [s["completion_tokens"] for s in c["result"]["steps"]] == [router.CHAT_DRAFT_TOKENS,
                                                                      router.CHAT_REFINE_TOKENS]
    assert all(s["instance"].startswith("ChatLLM-") for s in c["result"]["steps"])
    assert [s["completion_tokens"] for s in k["result"]["steps"]] == [router.CODE_PLAN_TOKENS,
                                                                      router.CODE_WRITE_TOKENS]
    assert all(s["instance"].startswith("CoderLLM-") for s in k["result"]["steps"])
    assert k["result"]["sources"][0] == "python_sqlite3.md#Placeholders and SQL injection"
    assert c["llm_calls"] == k["llm_calls"] == 3
    with pytest.raises(nalar.RemoteError, match="label must be one of"):
        stub.options(session="req-3", timeout=60).route("hello", "poetry").result(60)


def forced_seed(fail: str, paths: list[str]) -> int:
    """A seed whose draws fail ``fail`` on its first attempt only and pass everything else first time."""
    for seed in range(100_000):
        if (swe.review_draw(seed, fail, 0, swe.FAIL_RATE) == "FAIL" and swe.review_draw(seed, fail, 1, swe.FAIL_RATE)
                == "PASS" and all(swe.review_draw(seed, p, 0, swe.FAIL_RATE) == "PASS" for p in paths)):
            return seed
    raise AssertionError("no such seed")


def test_swe_recursion_and_re_entry(start_node: Any, client: nalar.Client) -> None:
    serve(start_node, swe.WORKLOAD)
    leaf = {"name": "redirect service", "path": "t0", "subtasks": []}
    deep = {"name": "click analytics", "path": "t1", "subtasks": [
        {"name": "click analytics: data model", "path": "t1/0", "subtasks": [
            {"name": "click analytics: data model: schema", "path": "t1/0/0", "subtasks": []},
            {"name": "click analytics: data model: indexes", "path": "t1/0/1", "subtasks": []}]},
        {"name": "click analytics: API", "path": "t1/1", "subtasks": []}]}
    paths = ["t1", "t1/0", "t1/0/0", "t1/0/1", "t1/1", "t2"]
    seed = forced_seed("t0", paths)
    project = {"idea": "a URL shortener with click analytics", "seed": seed, "fail_rate": swe.FAIL_RATE,
               "tasks": [leaf, deep, {"name": "storage layer", "path": "t2", "subtasks": []}]}
    r = client.stub("Company").options(session="project-1", timeout=90).build(project).result(90)
    assert r["session"] == "project-1" and r["tasks_by"] == "spec" and r["tasks_planned"] == 3
    assert [t["path"] for t in r["tasks"]] == ["t0", "t1", "t2"]

    def walk(t: dict[str, Any]) -> list[dict[str, Any]]:
        return [t] + [x for s in t["subtasks"] for x in walk(s)]

    done = [x for t in r["tasks"] for x in walk(t)]
    assert sorted(x["path"] for x in done) == sorted(["t0", *paths])
    assert all(x["status"] == "done" and x["verdict"] == "PASS" and x["verdict_by"] == "draw" for x in done)
    by_path = {x["path"]: x for x in done}
    # The forced failure: t0's engineer call raised, the company submitted it again, the second passed.
    assert by_path["t0"]["reentries"] == 1 and by_path["t0"]["attempt"] == 1 and len(by_path["t0"]["failures"]) == 1
    assert "review failed on attempt 0" in by_path["t0"]["failures"][0]
    assert r["reentries"] == 1 and r["implemented"] == len(done)
    # Recursion: t1 split (by the spec, since the model's plan does not parse) down to depth 2.
    assert r["max_depth"] == swe.MAX_DEPTH and by_path["t1/0/0"]["depth"] == 2
    assert by_path["t1"]["split_by"] == "spec" and by_path["t1/0/0"]["split_by"] == "depth limit"
    assert by_path["t1"]["work"]["completion_tokens"] == swe.INTEGRATE_TOKENS
    assert by_path["t0"]["work"]["completion_tokens"] == swe.CODE_TOKENS
    # The runtime saw the failed call of the session (what the lpt policy looks at).
    failed = sum(n.get("counters", {}).get("failed", 0) for n in client.status())
    assert failed >= 1
