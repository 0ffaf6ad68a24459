"""The actor runtime against a real nats-server and real node processes."""
from __future__ import annotations

import os
import time

import pytest

import nalar
from conftest import wait_for


def test_call_across_two_node_processes(start_node, client):
    a = start_node("sample_actors:Planner", name="agentnode")
    b = start_node("sample_actors:Calc", name="toolnode")
    out = client.stub("Planner").plan(2, 3).result(30)
    assert out["value"] == 10
    assert out["agent_pid"] == a.proc.pid
    assert out["tool"]["pid"] == b.proc.pid
    assert out["agent_pid"] != out["tool"]["pid"] != os.getpid()


def test_future_as_argument_and_chaining(start_node, client):
    start_node("sample_actors:Planner", "sample_actors:Calc")
    calc = client.stub("Calc")
    x = calc.add(1, 2)
    y = calc.add(x, 10)  # y depends on x: it runs once x has its value
    z = calc.add(y, calc.add(x, x))  # nested dependencies
    assert y.result(30) == 13
    assert z.result(30) == 19
    assert client.stub("Planner").chained(20, 22).result(30) == 42


def test_failed_dependency_fails_the_dependent_call(start_node, client):
    start_node("sample_actors:Calc")
    calc = client.stub("Calc")
    bad = calc.fail("no value")
    dependent = calc.add(bad, 1)
    with pytest.raises(nalar.DependencyFailed) as ei:
        dependent.result(30)
    assert "no value" in str(ei.value)


def test_fan_out_1000_with_gather(start_node, client):
    start_node("sample_actors:Calc=2")
    calc = client.stub("Calc")
    futures = [calc.add(i, 1) for i in range(1000)]
    values = nalar.gather(futures).result(60)
    assert values == [i + 1 for i in range(1000)]
    done, not_done = nalar.wait([calc.add(1, 1) for _ in range(10)], timeout=30)
    assert len(done) == 10 and not not_done
    # finished calls hold nothing: no pending entry, no armed deadline, on either side
    assert not client.runtime.pending and len(client.runtime._wheel) == 0
    (st,) = client.status()
    assert st["in_flight"] == 0 and st["armed_deadlines"] == 0


def test_remote_exception_carries_type_message_and_traceback(start_node, client):
    start_node("sample_actors:Planner", "sample_actors:Calc")
    with pytest.raises(nalar.RemoteError) as ei:
        client.stub("Calc").fail("it broke").result(30)
    e = ei.value
    assert (e.type, e.message, e.actor, e.method) == ("ValueError", "it broke", "Calc", "fail")
    assert "sample_actors.py" in e.traceback and "in fail" in e.traceback
    # a failure two hops down keeps the chain of futures
    with pytest.raises(nalar.RemoteError) as ei:
        client.stub("Planner").nested_fail().result(30)
    assert ei.value.actor == "Planner" and ei.value.type == "ValueError"
    assert ei.value.chain and ei.value.chain[0]["actor"] == "Calc"
    assert "deep failure" in ei.value.message


def test_deadline_expires_and_cancels_remote_work(start_node, client):
    start_node("sample_actors:Gate")
    gate = client.stub("Gate")
    f = gate.options(timeout=0.5).park(1)
    with pytest.raises(nalar.DeadlineExceeded):
        f.result(30)
    assert isinstance(f.exception(), TimeoutError)
    # the executor cancelled its task too (the node enforces the deadline it received)
    wait_for(lambda: gate.stats().result(30)["cancelled"] == 1, what="remote cancellation")


def test_result_timeout_is_local_and_the_call_goes_on(start_node, client):
    start_node("sample_actors:Gate")
    gate = client.stub("Gate")
    f = gate.park("late")
    with pytest.raises(nalar.Timeout):
        f.result(0.2)
    assert not f.available()
    gate.release().result(30)
    assert f.result(30) == "late"


def test_deadline_propagates_to_children(start_node, client):
    start_node("sample_actors:Planner", "sample_actors:Calc")
    t0 = time.time()
    out = client.stub("Planner").options(timeout=20).child_deadline().result(30)
    assert out["mine"] is not None and out["mine"] <= t0 + 21
    assert out["child"] <= out["mine"]  # the child asked for 1000 s but may not outlive its parent


def test_session_propagates_to_children(start_node, client):
    start_node("sample_actors:Planner", "sample_actors:Calc")
    assert client.stub("Planner").options(session="s-42").child_session().result(30) == "s-42"


def test_cancellation_propagates_down_the_tree(start_node, client):
    start_node("sample_actors:Planner", name="agents")
    start_node("sample_actors:Gate", name="gates")
    planner, gate = client.stub("Planner"), client.stub("Gate")
    f = planner.wait_on_gate()
    gate.wait_started(1).result(30)  # the grandchild call is parked on the Gate node
    assert f.cancel()
    with pytest.raises(nalar.Cancelled):
        f.result(1)
    wait_for(lambda: gate.stats().result(30)["cancelled"] == 1, what="cancel to reach the grandchild")


def test_unknown_actor_and_method_fail_fast(start_node, client):
    start_node("sample_actors:Calc")
    # default deadline is minutes away: an answer within the wait below can only be the clear error
    with pytest.raises(nalar.UnknownActor) as ei:
        client.stub("NoSuchActor").anything().result(20)
    assert "NoSuchActor" in str(ei.value)
    with pytest.raises(nalar.UnknownMethod) as ei:
        client.stub("Calc").no_such_method().result(20)
    assert "add" in str(ei.value)  # it lists what the actor has
    from sample_actors import Calc

    with pytest.raises(AttributeError):
        client.stub(Calc).no_such_method  # a class stub knows the methods at the call site


def test_non_json_argument_raises_type_error_at_call_site(start_node, client):
    start_node("sample_actors:Calc")
    calc = client.stub("Calc")
    before = dict(client.runtime.pending)
    for bad in (object(), {1, 2}, lambda: 1, complex(1, 2)):
        with pytest.raises(TypeError, match="cannot cross the bus"):
            calc.add(bad, 1)
    assert client.runtime.pending == before  # nothing was sent
    assert calc.add(b"ab", b"cd").result(30) == b"abcd"  # bytes are documented to travel


def test_oversized_payload_is_a_clear_error(start_node, client):
    start_node("sample_actors:Calc")
    calc = client.stub("Calc")
    limit = client.runtime.transport.max_payload
    with pytest.raises(nalar.PayloadTooLarge, match="max_payload"):
        calc.add("x" * (limit + 1), "")
    with pytest.raises(nalar.RemoteError, match="max_payload"):
        calc.blob(limit + 10).result(30)  # an oversized result comes back as an error, not a hang
    assert calc.add(1, 1).result(30) == 2


def test_malformed_bytes_on_every_subject_are_counted_and_the_node_keeps_serving(start_node, client, nats_url):
    start_node("sample_actors:Calc", name="victim")
    (st,) = [s for s in client.status() if s["node"] == "victim"]
    subjects = st["subjects"]
    assert len(subjects) >= 5
    garbage = [b"\x00\xff\xfe garbage", b"{not json", b"[1,2,3]", b'{"m": 5}', b""]
    bad_headers = {"Nalar-Id": "abc", "Nalar-Deadline": "nan"}

    import asyncio
    import nats

    async def spray() -> int:
        nc = await nats.connect(nats_url)
        n = 0
        for subject in subjects:
            concrete = subject.replace("*", "zz")
            for g in garbage:
                await nc.publish(concrete, g)
                await nc.publish(concrete, g, headers={"Nalar-Id": "x" * 500})
                await nc.publish(concrete, g, reply="junk.reply", headers={"Nalar-Id": "abc"})
                await nc.publish(concrete, b'{"m": "add", "a": [1, 2]}', headers=bad_headers)
                n += 4
        await nc.flush()
        await nc.close()
        return n

    asyncio.run(spray())

    def counted():
        s = [s for s in client.status() if s["node"] == "victim"][0]
        return s if len(s["malformed"]) >= 5 else None

    s = wait_for(counted, what="malformed messages to be counted")
    assert set(s["malformed"]) >= {"call", "cancel", "status", "control", "reply"}
    assert s["malformed"]["call"] >= len(garbage) * 3 - 3
    assert client.stub("Calc").add(2, 2).result(30) == 4  # still serving


def test_sync_instance_handles_one_message_at_a_time(start_node, client):
    start_node("sample_actors:Serial")
    serial = client.stub("Serial")
    assert nalar.gather([serial.work(i) for i in range(50)]).result(60) == list(range(50))
    stats = serial.stats().result(30)
    assert stats["peak"] == 1
    assert stats["threads"] == 1  # one pykka actor thread per instance


def test_max_concurrency_holds(start_node, client):
    start_node("sample_actors:Limited")
    limited = client.stub("Limited")
    assert nalar.gather([limited.work(i) for i in range(60)]).result(60) == list(range(60))
    assert limited.stats().result(30)["peak"] == 3


def test_status_lists_nodes_actors_instances(start_node, client):
    start_node("sample_actors:Calc=3", name="n1")
    start_node("sample_actors:Calc", "sample_actors:Serial", name="n2")
    nodes = {s["node"]: s for s in wait_for(lambda: len(client.status()) == 2 and client.status(), what="2 nodes")}
    assert len(nodes["n1"]["actors"]["Calc"]["instances"]) == 3
    assert set(nodes["n2"]["actors"]) == {"Calc", "Serial"}
    assert nodes["n1"]["actors"]["Calc"]["hints"]["max_concurrency"] == "default"
    # both nodes share Calc's load through the queue group
    calc = client.stub("Calc")
    pids = {calc.where().result(30)["pid"] for _ in range(60)}
    assert len(pids) == 2


def test_local_mode_runs_the_same_agent():
    from sample_actors import Calc, Planner

    with nalar.local(Planner, Calc) as app:
        out = app.stub(Planner).plan(2, 3).result(30)
        assert out["value"] == 10 and out["agent_pid"] == out["tool"]["pid"] == os.getpid()
        assert app.stub("Planner").chained(1, 2).result(30) == 3
        with pytest.raises(nalar.RemoteError) as ei:
            app.stub(Planner).nested_fail().result(30)
        assert ei.value.chain[0]["actor"] == "Calc"
        with pytest.raises(TypeError):
            app.stub(Calc).add(object(), 1)


def test_async_client_on_callers_loop(start_node, nats_url, namespace):
    start_node("sample_actors:Calc")
    import asyncio

    async def main() -> list[int]:
        async with await nalar.connect_async(nats_url, namespace) as c:
            calc = c.stub("Calc")
            one = await calc.add(1, 2)
            many = await nalar.gather([calc.add(i, i) for i in range(100)])
            return [one, sum(many)]

    assert asyncio.run(main()) == [3, 9900]


def test_dead_server_is_a_clear_error():
    with pytest.raises(nalar.BusError, match="cannot connect"):
        nalar.connect("nats://127.0.0.1:1", "x")


def test_pykka_helpers_work_on_nalar_futures(start_node, client):
    import pykka

    start_node("sample_actors:Calc")
    calc = client.stub("Calc")
    assert pykka.get_all([calc.add(1, 1), calc.add(2, 2)], timeout=30) == [2, 4]
    assert calc.add(1, 2).map(lambda v: v * 10).get(timeout=30) == 30
