"""The ``preemptable`` hint: a running call of low priority gives its instance up to a waiting call of
higher priority, goes back to its queue with its future id and runs again, with one effect.

Real node processes; what ran, in which order and how many times is counted where the methods run.
"""
from __future__ import annotations

from typing import Any

import nalar
from conftest import wait_for


def _started(stub: Any, name: str, runs: int = 1) -> bool:
    return sum(r[0] == name for r in stub.log().result(30)["runs"]) >= runs


def test_an_urgent_call_preempts_a_long_low_priority_one(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:Worker", "sample_batch:WorkerLog")
    low = client.stub("Worker", timeout=60, priority=0)
    high = client.stub("Worker", timeout=60, priority=10)
    w = client.stub("WorkerLog", timeout=60)
    slow = low.job("low", 2.0)
    wait_for(lambda: _started(w, "low"), what="the low-priority job to start")
    same = client.stub("Worker", timeout=60, priority=0).job("peer", 0.05)  # equal priority: it waits
    urgent = high.job("high", 0.05)
    assert urgent.result(30) == "high"
    assert not slow.available()  # it was preempted, not failed: it runs again
    assert slow.result(30) == "low" and same.result(30) == "peer"
    log = w.log().result(30)
    # the high one ran in the low one's place; the low one ran again, knowing it was preempted, and
    # before the peer of equal priority that came after it
    assert log["runs"] == [["low", 0], ["high", 0], ["low", 1], ["peer", 0]], log
    assert log["finished"] == ["high", "low", "peer"], log
    st = [n for n in client.status(5.0) if "Worker" in n.get("actors", {})][0]
    assert st["counters"]["preempted"] == 1, st["counters"]


def test_a_preempted_stateful_call_commits_once(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:Tally")
    long = client.stub("Tally", timeout=60, session="tally-a", priority=0).add(1, 1.5)
    wait_for(lambda: any(n.get("actors", {}).get("Tally", {}).get("running") for n in client.status(2.0)),
             what="the long call to run")
    assert client.stub("Tally", timeout=60, session="tally-b", priority=9).add(5, 0.0).result(30) == 5
    assert long.result(30) == 1  # run twice, committed once: not 2
    log = client.state_log("tally-a")["units"]["Tally"]
    assert [e["version"] for e in log] == [1] and log[0]["f"] == long.id, log  # one commit, by its own future
    st = [n for n in client.status(5.0) if "Tally" in n.get("actors", {})][0]
    assert st["counters"]["preempted"] == 1, st["counters"]  # (it was preempted: not merely queued)
    assert client.stub("Tally", timeout=60, session="tally-a").add(1, 0.0).result(30) == 2


def test_a_def_method_is_preempted_through_its_preempt_method(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:SyncWorker")
    slow = client.stub("SyncWorker", timeout=60, priority=0).job("slow", 300)
    wait_for(lambda: bool([n for n in client.status(2.0) if n.get("actors", {}).get("SyncWorker", {}).get("running")]),
             what="the def method to run")
    assert client.stub("SyncWorker", timeout=60, priority=5).job("quick", 1).result(30) == "quick"
    assert slow.result(60) == "slow"
    assert client.stub("SyncWorker", timeout=60).log().result(30) == ["slow", "quick", "slow"]


def test_a_preempted_generation_is_aborted_and_finds_its_prefix_when_it_runs_again(start_node: Any,
                                                                                   client: nalar.Client) -> None:
    """A model actor: preemption aborts the engine's sequence (it stops generating), and the re-run's
    prompt is served from the prefix cache the aborted sequence left."""
    start_node("sample_sim:PreemptLLM")
    llm = client.stub("PreemptLLM", timeout=120, priority=0, session="story")
    long = llm.generate("once upon a time " * 50, max_tokens=1500, ignore_eos=True)

    def stats() -> dict[str, Any]:
        (s,) = [n["actors"]["PreemptLLM"]["engine"] for n in client.status(5.0) if "PreemptLLM" in n["actors"]]
        return next(iter(s.values()))  # type: ignore[no-any-return]

    wait_for(lambda: stats()["running"] == 1 and stats()["steps"] > 5, what="the long generation to decode")
    quick = client.stub("PreemptLLM", timeout=60, priority=10, session="urgent").generate("now!", max_tokens=4)
    assert quick.result(60)["completion_tokens"] >= 1
    assert stats()["aborted"] == 1  # the engine dropped the long sequence for it
    out = long.result(120)
    assert out["completion_tokens"] == 1500 and out["cached_tokens"] > 0, out  # its prompt was still cached


def test_a_stale_preempt_request_does_not_fail_the_next_call(start_node: Any, client: nalar.Client) -> None:
    """The actor's flag outlived the call it was for (that one finished first): the next call that sees
    it and raises ``Preempted`` is run again, not failed."""
    start_node("sample_batch:SyncWorker")
    sw = client.stub("SyncWorker", timeout=60)
    assert sw.give_up().result(30) is None  # a preempt request nobody asked for, left behind
    assert sw.job("next", 3).result(30) == "next"  # it saw it, raised Preempted, and ran again
    assert sw.log().result(30) == ["next", "next"]
