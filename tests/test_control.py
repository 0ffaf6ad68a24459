"""Control, end to end: the policy primitives carried out by real node processes over a real NATS.

Most tests drive a ``PolicyActor`` in this process, on the test client's runtime, one round at a time:
a ``Scripted`` policy issues the primitives a test queues for the next round. The restart test runs
``nalar policy`` as its own process and kills it with SIGKILL.
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
import pytest

import nalar
from conftest import NodeProc, node_env, wait_for
from nalar.policy import PolicyActor
from nalar.policy.builtin import HeadOfLine
from sample_policies import Scripted

NALAR = [sys.executable, "-m", "nalar.cli.main"]
A, B = "na", "nb"


# -- helpers ------------------------------------------------------------------------------------------
def _on_loop(client: nalar.Client, fn: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return fn()
    assert client._lt is not None
    return client._lt.run(run(), 30)


def node_status(client: nalar.Client, node: str) -> dict[str, Any]:
    """One node's status, asked of it directly (faster to poll than the scatter/gather)."""
    rt = client.runtime
    assert client._lt is not None
    return client._lt.run(rt.request(rt.subjects.node(node), {"op": "status"}, 20), 30)


def instances(client: nalar.Client, node: str, actor: str, live: bool = True) -> list[dict[str, Any]]:
    return [i for i in node_status(client, node)["actors"][actor]["instances"] if not (live and i["draining"])]


def settle(client: nalar.Client, nodes: list[str]) -> None:
    """Wait for a heartbeat of every node sent after all of them were up: from then on every process
    (nodes included) knows every node is alive, so routes to any of them are in force everywhere."""
    t = time.monotonic() + 0.2
    wait_for(lambda: all(client.runtime.node_seen.get(n, (0.0,))[0] > t for n in nodes), 30, "node heartbeats")


_RUNNING: list["Ctl"] = []


@pytest.fixture(autouse=True)
def _stop_policy_actors(request: pytest.FixtureRequest) -> Any:
    """Stop every ``Ctl`` a test left running (its lease task) before the client it runs on closes."""
    if "client" in request.fixturenames:
        request.getfixturevalue("client")
    yield
    while _RUNNING:
        _RUNNING.pop().stop()


class Ctl:
    """A policy actor in this process; ``round(step, ...)`` runs one control round with those steps."""

    def __init__(self, client: nalar.Client, nodes: list[str], *policies: Any) -> None:
        self.client = client
        self.nodes = nodes
        self.script = Scripted()
        settle(client, nodes)
        self.actor = PolicyActor(client.runtime, [self.script, *policies], interval=3600, collect_timeout=20)
        assert client._lt is not None
        client._lt.run(self.actor.start(), 30)
        assert self.actor.role == "leader", self.actor.status()
        _RUNNING.append(self)

    def round(self, *steps: Callable[[Any, Any], Any]) -> dict[str, Any]:
        self.script.steps.extend(steps)
        assert self.client._lt is not None
        stats = self.client._lt.run(self.actor.round(), 120)
        assert not self.actor.errors, self.actor.errors
        assert stats["nodes"] == len(self.nodes) and stats["applied_by"] == len(self.nodes), stats
        return stats

    def stop(self) -> None:
        assert self.client._lt is not None
        if self in _RUNNING:
            _RUNNING.remove(self)
        self.client._lt.run(self.actor.stop(), 30)


def forget_decisions(client: nalar.Client) -> None:
    """Make ``client`` a caller that has not heard the decisions (as if it missed the broadcast)."""
    _on_loop(client, client.runtime.table.reset)


def start_policy(nats_url: str, namespace: str, env: dict[str, str], policies: str) -> NodeProc:
    """``nalar policy`` as an OS process, ready."""
    p = NodeProc(["--policies", policies, "--interval", "0.2", "--nats", nats_url, "--namespace", namespace],
                 node_env(env), cmd="policy", marker="policy actor ready")
    return p


# -- 1. routing ---------------------------------------------------------------------------------------
def test_session_routes_and_weights_steer_calls_even_from_callers_that_missed_them(
        start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=2", name=A)
    start_node("sample_actors:Pin=2", name=B)
    ctl = Ctl(client, [A, B])
    ctl.round(lambda v, act: act.route("s1", "Pin", f"Pin-{B}-1"))
    pin = client.stub("Pin")
    futs = [pin.options(session="s1").where() for _ in range(20)]
    assert {f.result(30) for f in futs} == {f"Pin-{B}-1"}
    assert [i["handled"] for i in instances(client, B, "Pin")] == [0, 20]

    with nalar.connect(nats_url, namespace) as other:  # a caller that never heard of the route
        forget_decisions(other)
        assert other.runtime.route("Pin", "s1") == other.runtime.subjects.call("Pin")
        futs = [other.stub("Pin").options(session="s1").where() for _ in range(30)]
        assert {f.result(30) for f in futs} == {f"Pin-{B}-1"}
        forwarded_by_a = node_status(client, A)["counters"]["forwarded"]
        assert forwarded_by_a > 0  # the queue group gave some to node A, which passed them on

        # weights: node B's instances get weight 0, so unrouted calls keep off them
        ctl.round(lambda v, act: act.route("Pin", [f"Pin-{A}-0", f"Pin-{A}-1", f"Pin-{B}-0", f"Pin-{B}-1"],
                                           [1, 1, 0, 0]))
        assert [i["weight"] for i in instances(client, B, "Pin")] == [0.0, 0.0]
        on_a = {f"Pin-{A}-0", f"Pin-{A}-1"}
        futs = [pin.where() for _ in range(20)] + [pin.options(session=f"u{i}").where() for i in range(20)]
        assert {f.result(30) for f in futs} <= on_a
        b_fwd = node_status(client, B)["counters"]["forwarded"]
        forget_decisions(other)  # (it took the snapshot when it heard of a batch it could not apply)
        assert other.runtime.route("Pin", None) == other.runtime.subjects.call("Pin")
        futs = [other.stub("Pin").where() for _ in range(30)]  # to the queue group: B hands its share to A
        assert {f.result(30) for f in futs} <= on_a
        assert node_status(client, B)["counters"]["forwarded"] > b_fwd
        # the session route is hard: it beats the weights
        assert {pin.options(session="s1").where().result(30) for _ in range(5)} == {f"Pin-{B}-1"}
        assert [i["handled"] for i in instances(client, B, "Pin")] == [0, 55]

    # removing the route: the session's calls follow the weights again
    ctl.round(lambda v, act: act.route("s1", "Pin", None))
    assert {pin.options(session="s1").where().result(30) for _ in range(10)} <= on_a


# -- 2. priorities --------------------------------------------------------------------------------------
def test_set_priority_reorders_queued_calls_on_each_node(start_node, client):
    for n in (A, B):
        start_node("sample_actors:Prio=1", "sample_actors:GateCtl", name=n)
    ctl = Ctl(client, [A, B])
    sessions = {n: [f"{n}-s{k}" for k in range(3)] for n in (A, B)}

    def setup(v: Any, act: Any) -> None:
        # node A: its sessions are routed to its instance (they wait in the instance's own queue);
        # node B: unrouted calls go there by weight (they wait in the actor's queue)
        for s in [f"{A}-gate", *sessions[A]]:
            act.route(s, "Prio", f"Prio-{A}-0")
        act.route("Prio", [f"Prio-{A}-0", f"Prio-{B}-0"], [0, 1])
        for n in (A, B):
            act.route(f"{n}-ctl", "GateCtl", f"GateCtl-{n}-0")

    ctl.round(setup)
    prio = client.stub("Prio")
    blockers = {n: prio.options(session=f"{n}-gate").block("g") for n in (A, B)}
    wait_for(lambda: all(instances(client, n, "Prio")[0]["running"] == 1 for n in (A, B)), 30, "blocked instances")
    futs = [prio.options(session=sessions[n][k]).step("order", f"{k}.{r}")
            for r in range(2) for k in range(3) for n in (A, B)]
    wait_for(lambda: all(node_status(client, n)["actors"]["Prio"]["queued"] == 6 for n in (A, B)), 30, "queues")
    assert instances(client, A, "Prio")[0]["queued"] == 6  # pinned on A; B's wait in the actor's queue
    assert instances(client, B, "Prio")[0]["queued"] == 0

    def prioritise(v: Any, act: Any) -> None:
        for n in (A, B):
            act.set_priority(sessions[n][2], 5)
            act.set_priority(sessions[n][1], 9, actor="GateCtl")  # another actor's: not Prio's queue
    ctl.round(prioritise)
    # calls arriving later take their session's priority too
    futs += [prio.options(session=sessions[n][k]).step("order", f"{k}.2") for k in (1, 2) for n in (A, B)]
    wait_for(lambda: all(node_status(client, n)["actors"]["Prio"]["queued"] == 8 for n in (A, B)), 30, "queues")
    for n in (A, B):
        assert client.stub("GateCtl").options(session=f"{n}-ctl").release("g").result(30) == f"GateCtl-{n}-0"
        assert blockers[n].result(30) == f"Prio-{n}-0"
    assert [f.result(30) for f in futs] == ([f"{k}.{r}" for r in range(2) for k in range(3) for n in (A, B)]
                                            + [f"{k}.2" for k in (1, 2) for n in (A, B)])
    for n in (A, B):
        ran = client.stub("GateCtl").options(session=f"{n}-ctl").ran("order").result(30)
        assert ran == ["2.0", "2.1", "2.2", "0.0", "1.0", "0.1", "1.1", "1.2"], (n, ran)

    # an explicit migrate hands a session's queued calls (of an actor without state) to another instance
    blocker = prio.options(session=f"{A}-gate").block("g2")
    wait_for(lambda: instances(client, A, "Prio")[0]["running"] == 1, 30, "A blocked again")
    moving = [prio.options(session=sessions[A][0]).step("moved", f"m{i}") for i in range(3)]
    wait_for(lambda: instances(client, A, "Prio")[0]["queued"] == 3, 30, "A's queue")
    ctl.round(lambda v, act: act.migrate(sessions[A][0], f"Prio-{A}-0", f"Prio-{B}-0"))
    assert [f.result(30) for f in moving] == ["m0", "m1", "m2"]
    assert client.stub("GateCtl").options(session=f"{B}-ctl").ran("moved").result(30) == ["m0", "m1", "m2"]
    assert node_status(client, A)["control"]["migrated"] == 3
    client.stub("GateCtl").options(session=f"{A}-ctl").release("g2").result(30)
    assert blocker.result(30) == f"Prio-{A}-0"


def test_queues_serve_older_requests_first_and_sticky_keeps_plain_fifo(start_node, client):
    start_node("sample_actors:Prio=1", "sample_actors:GateCtl", "sample_actors:Relay", name=A)
    ctl = Ctl(client, [A])
    prio, relay, gates = client.stub("Prio"), client.stub("Relay"), client.stub("GateCtl")

    def race(key: str) -> list[object]:
        """An older request's later stage reaches Prio's queue after a newer request's first call."""
        blocker = prio.block(f"{key}-g")
        wait_for(lambda: instances(client, A, "Prio")[0]["running"] == 1, 30, "Prio blocked")
        old = relay.later(f"{key}-r", key, "old")  # its request starts now; its call to Prio comes later
        wait_for(lambda: instances(client, A, "Relay")[0]["running"] == 1, 30, "the older request running")
        new = prio.step(key, "new")
        wait_for(lambda: node_status(client, A)["actors"]["Prio"]["queued"] == 1, 30, "the newer call queued")
        gates.release(f"{key}-r").result(30)
        wait_for(lambda: node_status(client, A)["actors"]["Prio"]["queued"] == 2, 30, "the older request's call")
        gates.release(f"{key}-g").result(30)
        assert blocker.result(30) and old.result(30) == "old" and new.result(30) == "new"
        return list(gates.ran(key).result(30))

    assert race("by-request") == ["old", "new"]
    ctl.round(lambda v, act: act.sticky("Prio", [f"Prio-{A}-0"]))  # the baseline's binding: FIFO by arrival
    assert race("fifo") == ["new", "old"]
    ctl.stop()


def test_a_budgeted_instance_admits_calls_while_their_cost_fits_and_sticky_hands_it_everything(
        start_node, client):
    start_node("sample_actors:Budgeted=1", "sample_actors:GateCtl", name=A)
    b, gates = client.stub("Budgeted"), client.stub("GateCtl")

    def running() -> tuple[int, int, int]:
        a = node_status(client, A)["actors"]["Budgeted"]
        i = a["instances"][0]
        return i["running"], a["queued"], i["admitted_cost"]

    big = b.hold("a", 12)  # over the budget, but alone: let in (no call is too big to ever run)
    wait_for(lambda: running() == (1, 0, 12), 30, "the big call running")
    six = b.hold("b", 6)
    wait_for(lambda: running() == (1, 1, 12), 30, "6 units waiting behind 12")
    gates.release("a").result(30)
    assert big.result(30) == 12
    wait_for(lambda: running() == (1, 0, 6), 30, "the 6-unit call running")
    five, two = b.hold("c", 5), b.hold("d", 2)  # 6 + 5 > 10: five waits, and two waits behind it
    wait_for(lambda: running() == (1, 2, 6), 30, "5 and 2 waiting")
    gates.release("b").result(30)
    assert six.result(30) == 12
    wait_for(lambda: running() == (2, 0, 7), 30, "5 + 2 units running together")
    for g in ("c", "d"):
        gates.release(g).result(30)
    assert five.result(30) <= 12 and two.result(30) <= 12

    ctl = Ctl(client, [A])
    ctl.round(lambda v, act: act.sticky("Budgeted", [f"Budgeted-{A}-0"]))  # the baseline: no budget
    held = [b.hold(f"s{k}", 6) for k in range(3)]
    wait_for(lambda: running() == (3, 0, 0), 30, "18 units at once under sticky, uncounted")
    for k in range(3):
        gates.release(f"s{k}").result(30)
    assert max(f.result(30) for f in held) == 18
    ctl.stop()


# -- 3. migration ---------------------------------------------------------------------------------------
def test_head_of_line_moves_queued_sessions_and_their_state_follows(start_node, client):
    start_node("sample_actors:Tally=1", "sample_actors:GateCtl", name=A)
    start_node("sample_actors:Tally=1", name=B)
    ctl = Ctl(client, [A, B], HeadOfLine(min_wait_ms=0, cooldown_rounds=1))

    def setup(v: Any, act: Any) -> None:
        act.route("Tally", [f"Tally-{A}-0", f"Tally-{B}-0"], [1, 0])  # new work goes to A only
        act.route("ctl", "GateCtl", f"GateCtl-{A}-0")

    ctl.round(setup)
    tally = client.stub("Tally")
    sessions = [f"s{i}" for i in range(4)]
    for s in sessions:  # state written on A
        assert tally.options(session=s).incr().result(30) == {"n": 1, "instance": f"Tally-{A}-0"}
    blocker = tally.options(session="blocker").hold("g")
    wait_for(lambda: instances(client, A, "Tally")[0]["running"] == 1, 30, "A busy")
    queued = {s: [tally.options(session=s).incr() for _ in range(2)] for s in sessions}
    # each session's first call waits in A's queue, its second behind it (a session's calls run in order)
    wait_for(lambda: node_status(client, A)["actors"]["Tally"]["queued"] == len(sessions), 30, "A's queue")

    # B is idle: head-of-line moves one waiting session per free slot per round
    for _ in range(40):
        ctl.round()
        if node_status(client, A)["control"]["migrated"] == 2 * len(sessions):
            break
    st = node_status(client, A)
    assert st["control"]["migrated"] == 2 * len(sessions), st["control"]
    assert st["actors"]["Tally"]["queued"] == 0
    for s in sessions:  # they ran on B, after their state came over: nothing lost, nothing twice
        assert [f.result(30) for f in queued[s]] == [{"n": 2, "instance": f"Tally-{B}-0"},
                                                     {"n": 3, "instance": f"Tally-{B}-0"}], s
    assert client.stub("GateCtl").options(session="ctl").release("g").result(30) == f"GateCtl-{A}-0"
    assert blocker.result(30) == f"Tally-{A}-0"

    for s in sessions:  # later calls follow the session to B
        assert tally.options(session=s).incr().result(30) == {"n": 4, "instance": f"Tally-{B}-0"}
        shown = client.state_show(s)
        assert shown["units"]["Tally"]["objects"] == {"n": 4}
        log = client.state_log(s)["units"]["Tally"]
        assert [e["version"] for e in log] == [1, 2, 3, 4] and len({e["f"] for e in log}) == 4
        assert [e["n"] for e in log] == [A, B, B, B]  # who committed each version
    assert node_status(client, B)["state"]["caught_up"] >= len(sessions)  # B read each session from the log

    # an explicit migrate with nothing queued: the route moves, the state follows on (or before) the next call
    ctl.round(lambda v, act: act.migrate("s0", f"Tally-{B}-0", f"Tally-{A}-0"))
    assert tally.options(session="s0").incr().result(30) == {"n": 5, "instance": f"Tally-{A}-0"}
    assert client.state_log("s0")["units"]["Tally"][-1]["n"] == A  # A committed the latest version

    # a migrate while one of the session's calls runs: the calls behind it move; the state moves
    # once the running call is done with it
    assert tally.options(session="r").incr().result(30) == {"n": 1, "instance": f"Tally-{A}-0"}
    running = tally.options(session="r").hold("g2")
    wait_for(lambda: instances(client, A, "Tally")[0]["running"] == 1, 30, "A busy")
    behind = [tally.options(session="r").incr() for _ in range(2)]
    wait_for(lambda: node_status(client, A)["in_flight"] == 3, 30, "the calls behind it at A")
    ctl.round(lambda v, act: act.migrate("r", f"Tally-{A}-0", f"Tally-{B}-0"))
    assert node_status(client, A)["control"]["migrated"] == 2 * len(sessions) + 2
    assert client.stub("GateCtl").options(session="ctl").release("g2").result(30) == f"GateCtl-{A}-0"
    assert running.result(30) == f"Tally-{A}-0"
    assert [f.result(30) for f in behind] == [{"n": 2, "instance": f"Tally-{B}-0"},
                                              {"n": 3, "instance": f"Tally-{B}-0"}]
    assert [e["n"] for e in client.state_log("r")["units"]["Tally"]] == [A, B, B]


def test_a_full_queue_answers_overloaded_at_once(start_node, client):
    start_node("sample_actors:Prio=1", "sample_actors:GateCtl", "--max-queue", "3", name=A)
    prio = client.stub("Prio")
    blocker = prio.block("full")
    wait_for(lambda: instances(client, A, "Prio")[0]["running"] == 1, 30, "a busy instance")
    queued = [prio.step("full", str(i)) for i in range(3)]
    wait_for(lambda: node_status(client, A)["actors"]["Prio"]["queued"] == 3, 30, "a full queue")
    with pytest.raises(nalar.Overloaded, match="max 3"):
        prio.step("full", "x").result(30)
    client.stub("GateCtl").release("full").result(30)
    assert blocker.result(30) == f"Prio-{A}-0" and [f.result(30) for f in queued] == ["0", "1", "2"]
    assert prio.step("full", "y").result(30) == "y"
    assert node_status(client, A)["counters"]["rejected"] == 1


# -- 4. provision and kill ------------------------------------------------------------------------------
def test_provision_and_kill_change_instance_counts_within_min_and_max(start_node, client):
    start_node("sample_actors:Scalable=1", name=A)
    start_node("sample_actors:Scalable=0", name=B)  # hosted with no instance, for the policy to provision
    ctl = Ctl(client, [A, B])
    said: list[bool] = []

    def grow(v: Any, act: Any) -> None:  # hints: min_instances=1, max_instances=3
        said.append(act.kill(f"Scalable-{A}-0"))  # the last one: refused
        said.append(act.provision("Scalable", B))
        said.append(act.provision("Scalable", B))
        said.append(act.provision("Scalable", A))  # a fourth: refused

    ctl.round(grow)
    assert said == [False, True, True, False]
    wait_for(lambda: len(instances(client, B, "Scalable")) == 2, 30, "two instances on B")
    assert [i["id"] for i in instances(client, B, "Scalable")] == [f"Scalable-{B}-0", f"Scalable-{B}-1"]
    assert len(instances(client, A, "Scalable")) == 1
    refused = client.policy_status()["refused"]
    assert len(refused) == 2 and "min_instances=1" in refused[0] and "max_instances=3" in refused[1], refused
    futs = [client.stub("Scalable").where() for _ in range(40)]
    where = {f.result(30) for f in futs}
    assert where <= {f"Scalable-{A}-0", f"Scalable-{B}-0", f"Scalable-{B}-1"}
    assert where & {f"Scalable-{B}-0", f"Scalable-{B}-1"}  # the new instances serve

    said.clear()

    def shrink(v: Any, act: Any) -> None:
        said.append(act.kill(f"Scalable-{B}-0"))
        said.append(act.kill(f"Scalable-{B}-1"))
        said.append(act.kill(f"Scalable-{A}-0"))  # would leave none: refused

    ctl.round(shrink)
    assert said == [True, True, False]
    wait_for(lambda: instances(client, B, "Scalable", live=False) == [], 30, "B's instances stopped")
    assert len(instances(client, A, "Scalable")) == 1
    ctl_b = node_status(client, B)["control"]
    assert (ctl_b["provisioned"], ctl_b["killed"]) == (2, 2)
    assert "min_instances=1" in client.policy_status()["refused"][-1]
    futs = [client.stub("Scalable").where() for _ in range(10)]
    assert {f.result(30) for f in futs} == {f"Scalable-{A}-0"}  # B no longer takes them


def test_a_kill_decided_while_a_provision_is_under_way_is_carried_out(start_node, client):
    start_node("sample_actors:SlowStart=1", "sample_actors:GateCtl", name=A)
    start_node("sample_actors:SlowStart=0", name=B)
    ctl = Ctl(client, [A, B])
    ctl.round(lambda v, act: (act.provision("SlowStart", A), act.route("ctl", "GateCtl", f"GateCtl-{A}-0")))

    def provisioning() -> bool:
        m = client._lt.run(ctl.actor.collect(), 60)
        return m[A]["actors"]["SlowStart"]["provisioning"] == 1

    wait_for(provisioning, 30, "an instance starting on A")
    said: list[bool] = []
    ctl.round(lambda v, act: said.append(act.kill(f"SlowStart-{A}-0")))  # 2 wanted -> 1, the old one goes
    assert said == [True]
    assert client.stub("GateCtl").options(session="ctl").release("start").result(30)
    wait_for(lambda: [i["id"] for i in instances(client, A, "SlowStart", live=False)] == [f"SlowStart-{A}-1"],
             30, "the new instance alone on A")
    assert {client.stub("SlowStart").where().result(30) for _ in range(5)} == {f"SlowStart-{A}-1"}


def test_a_policy_actor_restarted_on_an_empty_store_takes_over(start_node, client):
    for n in (A, B):
        start_node("sample_actors:Pin=1", name=n)
    ctl = Ctl(client, [A, B])
    ctl.round(lambda v, act: (act.route("Pin", [f"Pin-{A}-0", f"Pin-{B}-0"], [1, 0]), act.set_priority("s", 3),
                              act.route("s", "Pin", f"Pin-{B}-0")))
    assert instances(client, B, "Pin")[0]["weight"] == 0.0
    ctl.stop()

    async def wipe() -> None:  # the stored decisions are lost
        from nalar.bus import kv as bkv

        kv = await client.runtime.transport.jetstream().key_value(bkv.policy_bucket(client.runtime.subjects.ns))
        await kv.purge(bkv.POLICY_KEY)

    client._lt.run(wipe(), 30)
    ctl = Ctl(client, [A, B])  # announces its (empty) table in full: every process takes it
    for n in (A, B):
        wait_for(lambda n=n: node_status(client, n)["decisions"]["version"] == 0, 30, "the empty table")
        st = node_status(client, n)
        assert st["decisions"]["weights"] == {} and st["decisions"]["session_routes"] == {}
        assert st["decisions"]["priorities"] == 0
        assert [i["weight"] for i in st["actors"]["Pin"]["instances"]] == [1.0]
    ctl.round(lambda v, act: act.route("s", "Pin", f"Pin-{A}-0"))
    assert {client.stub("Pin").options(session="s").where().result(30) for _ in range(5)} == {f"Pin-{A}-0"}


# -- 5. the policy actor dies and comes back -------------------------------------------------------------
def test_killed_policy_actor_leaves_decisions_in_force_and_a_restart_continues(
        start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=1", "sample_actors:Scalable=1", name=A)
    start_node("sample_actors:Pin=1", "sample_actors:Scalable=0", name=B)
    want = {"routes": [["k1", "Pin", f"Pin-{B}-0"]], "instances": [["Scalable", B, 2]]}
    pol = start_policy(nats_url, namespace, {"NALAR_TEST_DECLARED": orjson.dumps(want).decode()},
                       "sample_policies:Declared")
    try:
        pol.wait_ready()
        wait_for(lambda: len(instances(client, B, "Scalable")) == 2, 60, "two instances on B")

        def settled() -> Any:  # a couple of rounds after the new instances were announced, with nothing new
            p = client.policy_status()
            if p is None or (p["last_round"] or {}).get("ops") != 0:
                return None
            v = p["decisions"]["version"]
            return v if all(node_status(client, n)["control"]["applied_version"] == v for n in (A, B)) else None

        v1 = wait_for(settled, 60, "decisions to settle")
        assert client.runtime.table.version == v1
        os.kill(pol.proc.pid, signal.SIGKILL)
        pol.proc.wait(30)
    finally:
        pol.stop()
    assert client.policy_status() is None

    # still serving, routes still enforced, also for a caller that missed them
    pin = client.stub("Pin")
    assert {pin.options(session="k1").where().result(30) for _ in range(10)} == {f"Pin-{B}-0"}
    with nalar.connect(nats_url, namespace) as other:
        forget_decisions(other)
        futs = [other.stub("Pin").options(session="k1").where() for _ in range(20)]
        assert {f.result(30) for f in futs} == {f"Pin-{B}-0"}

    # a new policy actor takes over from the stored decisions: no second provision, the version goes on
    want["routes"].append(["k2", "Pin", f"Pin-{A}-0"])
    pol = start_policy(nats_url, namespace, {"NALAR_TEST_DECLARED": orjson.dumps(want).decode()},
                       "sample_policies:Declared")
    try:
        line = pol.wait_ready()
        assert f"decisions v{v1}" in line, line
        wait_for(lambda: all(node_status(client, n)["control"]["applied_version"] == v1 + 1 for n in (A, B)),
                 60, "the new decision")
        rounds = client.policy_status()["rounds"]
        wait_for(lambda: client.policy_status()["rounds"] >= rounds + 3, 60, "more rounds")
        p = client.policy_status()
        assert p["decisions"]["version"] == v1 + 1 and p["decisions"]["scale"] == {B: {"Scalable": 2}}
        assert len(instances(client, B, "Scalable", live=False)) == 2
        assert node_status(client, B)["control"]["provisioned"] == 2
        assert {pin.options(session="k2").where().result(30) for _ in range(5)} == {f"Pin-{A}-0"}
        assert {pin.options(session="k1").where().result(30) for _ in range(5)} == {f"Pin-{B}-0"}
    finally:
        pol.stop()


# -- 6. nalar status ------------------------------------------------------------------------------------
def test_nalar_status_shows_the_decisions_in_force(start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=1", "sample_actors:Scalable=1", name=A)
    start_node("sample_actors:Pin=1", "sample_actors:Scalable=0", name=B)
    ctl = Ctl(client, [A, B])

    def decide(v: Any, act: Any) -> None:
        act.route("s1", "Pin", f"Pin-{B}-0")
        act.route("Pin", [f"Pin-{A}-0", f"Pin-{B}-0"], [3, 1])
        act.set_priority("s1", 7)
        act.kill(f"Scalable-{A}-0")  # refused: the only one (min_instances=1)
        act.provision("Scalable", B)

    v = ctl.round(decide)["v"]
    args = ["status", "--nats", nats_url, "--namespace", namespace]
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60, env=node_env())
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "policy actor  scripted" in out, out
    assert f"decisions in force: v{v}" in out, out
    assert f"route Pin: Pin-{A}-0 x3, Pin-{B}-0 x1" in out, out
    assert "session routes Pin: 1 sessions" in out and "priorities: 1 sessions" in out, out
    assert f"instances wanted on {B}: Scalable x1" in out, out
    assert "refused: kill(Scalable-na-0)" in out, out
    assert out.count(f"control: decisions v{v}") == 2, out

    r = subprocess.run([*NALAR, *args, "--json"], capture_output=True, text=True, timeout=60, env=node_env())
    doc = orjson.loads(r.stdout)
    assert doc["policy"]["decisions"]["version"] == v
    assert {n["node"]: n["decisions"]["version"] for n in doc["nodes"]} == {A: v, B: v}
    assert {n["node"]: n["decisions"]["session_routes"] for n in doc["nodes"]} == {A: {"Pin": 1}, B: {"Pin": 1}}

    ctl.stop()  # without the policy actor the nodes keep (and show) what was decided
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60, env=node_env())
    assert "policy actor  not running" in r.stdout and r.stdout.count(f"control: decisions v{v}") == 2, r.stdout


# -- malformed decisions ----------------------------------------------------------------------------------
def test_a_malformed_decision_batch_is_counted_and_hurts_no_node(start_node, client, nats_url, namespace):
    start_node("sample_actors:Pin=1", name=A)
    start_node("sample_actors:Pin=1", name=B)
    bad = [b"not json", b"[]", b'{"v": "1", "ops": []}', b'{"v": 1, "ops": {}}', b'{"v": 1, "prev": 0, "ops": [["route"]]}',
           b'{"v": 1, "prev": 0, "ops": [["weights", "Pin", {"x": -1}]]}',
           b'{"v": 1, "prev": 0, "ops": [["route", "s", "Pin", "Pin-nb-0"], ["scale", "na", "Pin", true, []]]}',
           b'{"v": 1, "prev": 0, "ops": [["migrate", "id", "s", "Pin", 5, "x"]]}']

    async def publish() -> None:
        nc = await nats.connect(nats_url)
        for body in bad:
            await nc.publish(f"nalar.{namespace}.policy", body)
        await nc.flush()
        await nc.close()

    asyncio.run(publish())
    for n in (A, B):
        wait_for(lambda n=n: node_status(client, n)["malformed"].get("policy", 0) == len(bad), 30, "malformed counts")
        st = node_status(client, n)
        assert st["decisions"]["version"] == 0 and st["decisions"]["session_routes"] == {}  # nothing half-applied
    assert client.runtime.malformed.get("policy") == len(bad)
    futs = [client.stub("Pin").where() for _ in range(20)]
    assert {f.result(30) for f in futs} <= {f"Pin-{A}-0", f"Pin-{B}-0"}
    # and a good batch after them still applies
    ctl = Ctl(client, [A, B])
    ctl.round(lambda v, act: act.route("s", "Pin", f"Pin-{A}-0"))
    assert {client.stub("Pin").options(session="s").where().result(30) for _ in range(5)} == {f"Pin-{A}-0"}


def test_an_order_decision_carries_each_programs_service_along_its_critical_path(start_node, client):
    """Program-level scheduling (``plas``): a call carries what its program received so far, summed over
    calls made one after another and the longest of calls made side by side (ATLAS's critical path)."""
    start_node("sample_actors:Program", "sample_actors:Work", name=A)
    ctl = Ctl(client, [A])
    prog = client.stub("Program")
    assert prog.chain([30, 30, 30]).result(30) == [0, 0, 0]  # no decision: nothing measured, nothing sent
    ctl.round(lambda v, act: act.order("*", 1.0, 30.0))
    seen = prog.chain([60, 60, 60]).result(30)
    assert seen[0] == 0 and 60_000 <= seen[1] < seen[2] and 120_000 <= seen[2] < 1_000_000, seen
    last = prog.fan([150, 60, 20]).result(30)  # the longest branch, not the sum (230 ms)
    assert 150_000 <= last < 225_000, last
    assert node_status(client, A)["decisions"]["order"] == {"*": {"weight": 1.0, "bound_s": 30.0}}
    ctl.round(lambda v, act: act.order("*", None))
    assert prog.chain([30, 30]).result(30) == [0, 0]
    ctl.stop()
