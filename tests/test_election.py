"""One policy actor leads per namespace, and nodes take decisions only from it, within the hints.

Real ``nalar policy`` and ``nalar node`` processes over a real nats-server (open mode: the test
publishes forged batches on ``nalar.<ns>.policy`` itself, as a holder of stolen credentials could).
The first tests drive ``TermGate`` and the arrival checks in-process, without a server.

This module is also what the processes import: ``test_election:Ticker`` (a policy that changes one
decision every round, so versions keep moving) and ``test_election:Slow`` (an actor with no
``max_instances``).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import nats
import orjson

import nalar
from conftest import NodeProc, node_env, wait_for
from nalar.actors.control import TermGate, checks
from nalar.policy import Actions, Policy, View

NALAR = [sys.executable, "-m", "nalar.cli.main"]
A = "na"


class Ticker(Policy):
    """Sets the priority of session ``tick`` to the round number: one op, a new version, every round."""

    name = "ticker"

    def decide(self, view: View, act: Actions) -> None:
        act.set_priority("tick", view.round)


class Slow(nalar.Tool):
    """No ``max_instances``: only ``NALAR_MAX_INSTANCES`` bounds what one node may be asked to run."""

    def ping(self) -> str:
        return "pong"


# -- helpers ------------------------------------------------------------------------------------------
def start_policy(nats_url: str, namespace: str, name: str, policies: str) -> NodeProc:
    """``nalar policy --name NAME`` as an OS process (not yet ready: ``wait_ready``)."""
    return NodeProc(["--name", name, "--policies", policies, "--interval", "0.2", "--nats", nats_url,
                     "--namespace", namespace], node_env(), cmd="policy", marker="policy actor ready")


def node_status(client: nalar.Client, node: str) -> dict[str, Any]:
    rt = client.runtime
    assert client._lt is not None
    return client._lt.run(rt.request(rt.subjects.node(node), {"op": "status"}, 20), 30)


def refused(client: nalar.Client, node: str, kind: str) -> int:
    return int(node_status(client, node)["control"]["refused"].get(kind, 0))


def live(client: nalar.Client, node: str, actor: str) -> int:
    return sum(not i["draining"] for i in node_status(client, node)["actors"][actor]["instances"])


def publish(nats_url: str, namespace: str, batch: dict[str, Any]) -> None:
    """A batch on the decisions subject, from a connection of its own (nobody's policy actor)."""
    async def go() -> None:
        nc = await nats.connect(nats_url)
        await nc.publish(f"nalar.{namespace}.policy", orjson.dumps(batch))
        await nc.flush()
        await nc.close()

    asyncio.run(go())


def leading(client: nalar.Client, pred: Callable[[dict[str, Any]], bool] = lambda st: True) -> Callable[[], Any]:
    def check() -> Any:
        st = client.policy_status()
        return st if st is not None and st.get("role") == "leader" and pred(st) else None
    return check


# -- the term gate, in-process ------------------------------------------------------------------------
class _Gate(TermGate):
    """A ``TermGate`` whose lease reads wait for the test to answer them."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        super().__init__(lambda: None, "t", self.counters)
        self.reads = 0
        self.answer: asyncio.Future[Any] | None = None

    async def _read(self) -> Any:
        self.reads += 1
        self.answer = asyncio.get_running_loop().create_future()
        return await self.answer


def test_a_new_term_waits_for_the_lease_and_batches_behind_it_keep_their_order():
    async def run() -> None:
        g = _Gate()
        done: list[str] = []
        why: list[str] = []

        def admit(term: int, tag: str, snapshot: bool = False) -> None:
            g.admit(term, lambda: done.append(tag), snapshot=snapshot, refused=why.append)

        admit(0, "no term")  # nothing known yet: a deployment without JetStream
        admit(5, "t5 first")  # a new term: held while the lease is read...
        admit(5, "t5 second")  # ...and the batches behind it, whatever their term
        admit(0, "no term, late")
        await asyncio.sleep(0)
        assert done == ["no term"] and g.reads == 1 and g.term == 0
        assert g.answer is not None
        g.answer.set_result((5, 7))  # the lease names term 5 at revision 7
        await asyncio.sleep(0)
        assert done == ["no term", "t5 first", "t5 second"] and g.term == 5
        assert why == ["stale_term"] and g.counters == {"stale_term": 1}
        admit(3, "t3")  # older: refused at once, no read
        admit(5, "t5 third")
        assert done[-1] == "t5 third" and g.reads == 1 and why[-1] == "stale_term"

        admit(9, "t9 forged")  # the lease says 5: forged; the one queued behind it is refused without a read
        admit(9, "t9 forged again")
        await asyncio.sleep(0)
        g.answer.set_result((5, 8))
        await asyncio.sleep(0)
        assert why[-2:] == ["forged_term", "forged_term"] and g.reads == 2 and g.term == 5
        assert g.counters == {"stale_term": 2, "forged_term": 2}

        admit(7, "t7")  # the lease already names a later leader: t7 is stale, and the known term is its
        await asyncio.sleep(0)
        g.answer.set_result((12, 12))
        await asyncio.sleep(0)
        assert why[-1] == "stale_term" and g.term == 12
        admit(12, "t12")
        assert done[-1] == "t12"

        admit(20, "snapshot", snapshot=True)  # nobody holds the lease: the stored decisions apply...
        await asyncio.sleep(0)
        g.answer.set_result(None)
        await asyncio.sleep(0)
        assert done[-1] == "snapshot" and g.term == 12  # ...but an unproven term is not adopted
        admit(20, "batch")  # a batch needs a leader
        await asyncio.sleep(0)
        g.answer.set_result(None)
        await asyncio.sleep(0)
        assert done[-1] == "snapshot" and why[-1] == "forged_term"
        admit(13, "above the revision")  # a term above the lease entry's revision is never real
        await asyncio.sleep(0)
        g.answer.set_result((13, 12))
        await asyncio.sleep(0)
        assert why[-1] == "forged_term" and g.term == 12

    asyncio.run(run())


def test_the_arrival_checks_count_what_the_decisions_leave_elsewhere(monkeypatch):
    alive = {"a", "b"}.__contains__
    table_scale = {"b": {"P": (2, [])}}
    table_instances = {"P-a-0": "a", "P-b-0": "b", "P-c-0": "c", "Q-b-0": "b"}
    # b's wanted count (2) counts, not its one placed instance; c is not alive
    assert checks.placed_elsewhere("P", "a", [], False, table_scale, table_instances, alive) == 2
    # the batch removes b's wish and places another instance there
    ops = [["scale", "b", "P", None, []], ["instance", "P-b-1", "b"]]
    assert checks.placed_elsewhere("P", "a", ops, False, table_scale, table_instances, alive) == 2
    assert checks.placed_elsewhere("P", "a", ops, True, table_scale, table_instances, alive) == 1  # a snapshot
    assert checks.placed_elsewhere("P", "b", ops, False, table_scale, table_instances, alive) == 1  # a's one
    assert checks.scale_refusal("P", "a", 0, 1, 1, None, lambda: 1) is None
    assert checks.scale_refusal("P", "a", 0, 1, 2, None, lambda: 1)[0] == "below_min"
    assert checks.scale_refusal("P", "a", 1, 1, 3, None, lambda: 0) is None  # not a cut: left as it is
    assert checks.scale_refusal("P", "a", 4, 1, 1, 3, lambda: 0)[0] == "above_max"
    assert checks.scale_refusal("P", "a", 257, 1, 1, None, lambda: 0)[0] == "absurd_count"
    monkeypatch.setenv("NALAR_MAX_INSTANCES", "8")
    assert checks.scale_refusal("P", "a", 9, 1, 1, None, lambda: 0)[0] == "absurd_count"
    assert checks.scale_refusal("P", "a", 8, 1, 1, None, lambda: 0) is None
    assert checks.version_jump(0, 2**53) is None  # nothing applied yet
    assert checks.version_jump(5, 5 + checks.MAX_VERSION_JUMP) is None
    assert "jumps" in checks.version_jump(5, 2**53)


# -- election, end to end -----------------------------------------------------------------------------
def test_two_policy_actors_elect_one_and_a_standby_takes_over_from_a_killed_leader(
        start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=1", name=A)
    pols = {n: start_policy(nats_url, namespace, n, "test_election:Ticker") for n in ("p1", "p2")}  # at once
    try:
        for p in pols.values():
            p.wait_ready()
        st = wait_for(leading(client, lambda st: len(st["standbys"]) == 1), 30, "a leader and a standby")
        leader, standby, t1 = st["name"], st["standbys"][0], st["term"]
        assert {leader, standby} == {"p1", "p2"} and t1 > 0
        assert [(a["name"], a["role"]) for a in st["actors"]] == [(leader, "leader"), (standby, "standby")]
        r = subprocess.run([*NALAR, "status", "--nats", nats_url, "--namespace", namespace], capture_output=True,
                           text=True, timeout=60, env=node_env())
        assert f"leader {leader} (term {t1}), standbys: {standby}" in r.stdout, r.stdout
        wait_for(lambda: node_status(client, A)["control"]["term"] == t1
                 and node_status(client, A)["control"]["applied_version"] >= 3, 30, "decisions under the first term")

        os.kill(pols[leader].proc.pid, signal.SIGKILL)
        killed = time.time()
        pols[leader].proc.wait(30)
        # (led: its takeover done, which ``terms`` records; the lease alone can show a moment before that)
        st = wait_for(leading(client, lambda st: st["name"] == standby and st["term"] > t1
                              and any(t["term"] == st["term"] for t in st["terms"])), 15, "the standby to lead")
        seen = time.time() - killed
        took = next(t["since"] for t in st["terms"] if t["term"] == st["term"]) - killed
        print(f"\ntakeover after kill -9: the standby led {took:.2f} s after it (status showed it at {seen:.2f} s)")
        assert took < 5.0 and seen < 6.0, (took, seen)
        t2, v2, rounds = st["term"], st["terms"][-1]["v"], st["rounds"]

        # decisions go on, with the higher term
        wait_for(lambda: client.policy_status()["rounds"] >= rounds + 3, 30, "rounds under the new leader")
        wait_for(lambda: (lambda c: c["term"] == t2 and c["applied_version"] > v2)(node_status(client, A)["control"]),
                 30, "the node applying the new term's decisions")

        # a batch of the old term is refused, and changes nothing
        before = node_status(client, A)
        v = before["control"]["applied_version"]
        publish(nats_url, namespace, {"v": v + 1, "prev": v, "term": t1, "ops": [["route", "evil", "Pin", f"Pin-{A}-0"]]})
        wait_for(lambda: refused(client, A, "stale_term") > before["control"]["refused"].get("stale_term", 0), 30,
                 "the old term's batch refused")
        after = node_status(client, A)
        assert after["decisions"]["session_routes"] == {} and after["control"]["term"] == t2
        assert after["counters"]["stale_term"] >= 1
        assert "older than term" in after["control"]["refusals"]["term"]
        wait_for(lambda: client.runtime.counters.get("stale_term", 0) >= 1, 10, "the client refusing it too")
        assert client.runtime.table.routes.get("Pin", {}) == {}
    finally:
        for p in pols.values():
            p.stop()


def test_a_forged_term_is_refused_and_a_cleanly_stopped_leader_hands_over_at_once(
        start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=1", name=A)
    p1 = start_policy(nats_url, namespace, "p1", "none")
    p2: NodeProc | None = None
    try:
        p1.wait_ready()
        st = wait_for(leading(client), 30, "a leader")
        t = st["term"]
        wait_for(lambda: node_status(client, A)["control"]["applied_version"] >= 1, 30, "the first decisions")
        before = node_status(client, A)
        v = before["control"]["applied_version"]
        evil = [["route", "evil", "Pin", f"Pin-{A}-0"]]
        publish(nats_url, namespace, {"v": v + 1, "prev": v, "term": t + 1000, "ops": evil})
        wait_for(lambda: refused(client, A, "forged_term") == 1, 30, "the forged term refused")
        publish(nats_url, namespace, {"v": v + 1, "prev": v, "ops": evil})  # no term, once a term is known
        wait_for(lambda: refused(client, A, "stale_term") == 1, 30, "the termless batch refused")
        after = node_status(client, A)
        assert after["decisions"]["session_routes"] == {} and after["control"]["applied_version"] == v
        assert after["control"]["term"] == t and after["counters"]["forged_term"] == 1
        rounds = client.policy_status()["rounds"]
        wait_for(lambda: (lambda s: s["rounds"] > rounds + 2 and s["last_round"]["applied_by"] == 1)(
            client.policy_status()), 30, "the real leader's batches still applied")

        p2 = start_policy(nats_url, namespace, "p2", "none")
        assert "standby (leader p1)" in p2.wait_ready()
        wait_for(leading(client, lambda st: st["standbys"] == ["p2"]), 30, "p2 standing by")
        p1.proc.terminate()  # a clean stop lets go of the lease
        stopped = time.time()
        st = wait_for(leading(client, lambda st: st["name"] == "p2" and bool(st["terms"])), 15, "p2 to lead")
        took = st["terms"][-1]["since"] - stopped
        print(f"\ntakeover after a clean stop: {took:.2f} s")
        assert took < 2.0 and st["term"] > t
        assert p1.proc.wait(30) == 0
    finally:
        p1.stop()
        if p2 is not None:
            p2.stop()


# -- decisions checked on arrival -----------------------------------------------------------------------
def test_a_node_refuses_decisions_that_break_the_hints_whoever_sends_them(start_node, client, nats_url, namespace):
    start_node("sample_actors:Scalable=1", "test_election:Slow=1", name="f0", env={"NALAR_MAX_INSTANCES": "16"})
    start_node("sample_actors:Counter=1", "sample_actors:Scalable=1", name="f1")
    pol = start_policy(nats_url, namespace, "p1", "none")
    try:
        pol.wait_ready()
        t = wait_for(leading(client), 30, "a leader")["term"]
        for n in ("f0", "f1"):
            wait_for(lambda n=n: node_status(client, n)["control"]["applied_version"] >= 1, 30, "the first decisions")
        # the policy actor changes nothing from here on (no policies). Each forged batch carries the
        # leader's own term, as a thief of the policy's credentials could send it, and the next version
        # of the node it is aimed at (another node that cannot judge an op takes it: versions diverge)
        counts = {("f0", "Scalable"): 1, ("f0", "Slow"): 1, ("f1", "Counter"): 1, ("f1", "Scalable"): 1}

        def forge(node: str, ops: list[Any]) -> dict[str, Any]:
            st = node_status(client, node)
            v = st["control"]["applied_version"]
            publish(nats_url, namespace, {"v": v + 1, "prev": v, "term": t, "ops": ops})
            return st

        def unchanged(node: str, before: dict[str, Any]) -> None:
            for (n, actor), c in counts.items():
                assert live(client, n, actor) == c, (n, actor)
            st = node_status(client, node)
            assert st["control"]["applied_version"] == before["control"]["applied_version"]
            assert st["decisions"]["scale"].get(node) == before["decisions"]["scale"].get(node)
            assert st["control"]["provisioned"] == before["control"]["provisioned"]
            assert st["control"]["killed"] == before["control"]["killed"]

        # a cut the instance on the other node allows is carried out; the same cut there is then refused
        forge("f1", [["scale", "f1", "Scalable", 0, []]])
        wait_for(lambda: live(client, "f1", "Scalable") == 0, 30, "f1's Scalable drained")
        counts[("f1", "Scalable")] = 0
        before = forge("f0", [["scale", "f0", "Scalable", 0, []]])
        wait_for(lambda: refused(client, "f0", "below_min") == 1, 30, "the last Scalable kept")
        unchanged("f0", before)
        assert client.stub("Scalable").where().result(30) == "Scalable-f0-0"

        for node, kind, op in [("f1", "below_min", ["scale", "f1", "Counter", 0, []]),  # its only instance
                               ("f0", "above_max", ["scale", "f0", "Scalable", 4, []]),  # max_instances=3
                               ("f1", "absurd_count", ["scale", "f1", "Counter", 1000, []]),  # no max; 256 per node
                               ("f0", "absurd_count", ["scale", "f0", "Slow", 40, []])]:  # NALAR_MAX_INSTANCES=16
            n0 = refused(client, node, kind)
            before = forge(node, [op])
            wait_for(lambda: refused(client, node, kind) == n0 + 1, 30, f"{kind} refused on {node}")
            unchanged(node, before)
        assert "at most 256 per node" in node_status(client, "f1")["control"]["refusals"]["scale Counter"]
        assert "max_instances is 3" in node_status(client, "f0")["control"]["refusals"]["scale Scalable"]

        # the issue's forged batch, as it was sent (no term) and again with the leader's term
        issue = {"v": 2**53, "full": True, "ops": [["scale", "f1", "Counter", 0, []], ["scale", "f0", "Slow", 40, []]]}
        for batch, kind in ((issue, "stale_term"), (dict(issue, term=t), "version_jump")):
            before = {n: node_status(client, n) for n in ("f0", "f1")}
            publish(nats_url, namespace, batch)
            for n in ("f0", "f1"):
                wait_for(lambda n=n: refused(client, n, kind) == before[n]["control"]["refused"].get(kind, 0) + 1,
                         30, f"{kind} on {n}")
                unchanged(n, before[n])
        assert "jumps" in node_status(client, "f0")["control"]["refusals"]["version"]

        r = subprocess.run([*NALAR, "status", "--nats", nats_url, "--namespace", namespace], capture_output=True,
                           text=True, timeout=60, env=node_env())
        assert "refused decisions (term" in r.stdout, r.stdout
        assert "absurd_count 1, below_min 1, stale_term 1, version_jump 1" in r.stdout, r.stdout  # f1
        assert "above_max 1, absurd_count 1, below_min 1, stale_term 1, version_jump 1" in r.stdout, r.stdout  # f0
    finally:
        pol.stop()


def test_status_json_carries_the_election(start_node, client, nats_url, namespace):
    """``nalar status --json``: the policy's name, role, term and standbys; each node's refusals."""
    start_node("sample_actors:Pin=1", name=A)
    pol = start_policy(nats_url, namespace, "solo", "none")
    try:
        pol.wait_ready()
        t = wait_for(leading(client), 30, "a leader")["term"]
        publish(nats_url, namespace, {"v": 1, "ops": []})
        wait_for(lambda: refused(client, A, "stale_term") == 1, 30, "a termless batch refused")
        r = subprocess.run([*NALAR, "status", "--json", "--nats", nats_url, "--namespace", namespace],
                           capture_output=True, text=True, timeout=60, env=node_env())
        doc = orjson.loads(r.stdout)
        p = doc["policy"]
        assert (p["name"], p["role"], p["term"], p["leader"], p["standbys"]) == ("solo", "leader", t, "solo", [])
        [n] = doc["nodes"]
        assert n["control"]["term"] == t and n["control"]["refused"] == {"stale_term": 1}
    finally:
        pol.stop()
