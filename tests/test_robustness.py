"""Bad input and misbehaving code: clear errors, nothing lost, the node keeps serving."""
from __future__ import annotations

import asyncio
import threading

import nats
import orjson
import pytest

import nalar
from conftest import NodeProc, node_env, wait_for


def test_results_and_calls_near_max_payload_fail_clearly_and_keep_the_connection(start_node, client):
    start_node("sample_actors:Rough", "sample_actors:Gate")
    rough = client.stub("Rough")
    limit = client.runtime.transport.max_payload
    bystander = client.stub("Gate").park("bystander")  # in flight on the same node throughout
    # the body alone fits, but headers push it over: must not reach the server (it would cut us off)
    with pytest.raises(nalar.RemoteError, match="max_payload"):
        rough.blob(limit - 20).result(30)
    with pytest.raises(nalar.PayloadTooLarge):
        rough.echo("x" * (limit - 20))
    with pytest.raises(nalar.RemoteError, match="characters cut"):
        rough.big_error(5_000_000).result(30)  # an error too large to send is trimmed, not lost
    # too large only once its dependencies are filled in: the blob waits for the gate, so it is still
    # pending when the echo is made (a race the test would otherwise lose to a fast reply)
    half = rough.blob(client.stub("Gate").park(limit // 2 + 10))
    both = rough.echo([half, half])
    client.stub("Gate").release().result(30)
    with pytest.raises(nalar.BadRequest, match="max_payload"):
        both.result(30)
    assert bystander.result(30) == "bystander"  # the node's connection survived all of it
    assert rough.echo(1).result(30) == 1


def test_user_dicts_with_the_bytes_key_are_left_alone(start_node, client):
    start_node("sample_actors:Rough")
    rough = client.stub("Rough")
    assert rough.echo({"$bytes": "aGk="}).result(30) == {"$bytes": "aGk="}
    assert rough.echo([b"raw", {"k": b"\x00"}]).result(30) == [b"raw", {"k": b"\x00"}]
    with pytest.raises(TypeError, match="reserved"):
        rough.echo([b"raw", {"$bytes": "aGk="}])


def test_invalid_bytes_in_a_call_is_a_bad_request(start_node, client, nats_url, namespace):
    start_node("sample_actors:Rough", name="rough")

    async def send(body: bytes) -> dict:
        nc = await nats.connect(nats_url)
        msg = await nc.request(f"nalar.{namespace}.call.Rough", body, timeout=10, headers={"Nalar-Id": "raw-1"})
        await nc.close()
        return orjson.loads(msg.data)

    reply = asyncio.run(send(b'{"m": "echo", "a": [{"$bytes": "not base64!"}], "b": 1}'))
    assert reply["e"]["kind"] == "bad_request" and "$bytes" in reply["e"]["message"]
    deep = b'{"m": "echo", "a": [' + b"[" * 5000 + b"]" * 5000 + b'], "b": 1}'
    reply = asyncio.run(send(deep))
    assert reply["e"]["kind"] == "bad_request"
    (st,) = [s for s in client.status() if s["node"] == "rough"]
    assert st["malformed"]["call"] >= 1
    assert client.stub("Rough").echo(2).result(30) == 2


def test_bad_timeouts_fail_at_the_call_site_and_hurt_no_one_else(start_node, client):
    start_node("sample_actors:Rough")
    rough = client.stub("Rough")
    for bad in (float("inf"), float("nan"), -1, 0, "5"):
        with pytest.raises(ValueError, match="timeout"):
            rough.options(timeout=bad).echo(1)
    results: list[object] = []

    def worker(i: int) -> None:
        if i % 10 == 0:
            try:
                rough.options(timeout=float("inf")).echo(i)
            except ValueError:
                pass
        results.append(rough.echo(i).result(30))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(50))


def test_system_exit_keyboard_interrupt_and_unprintable_errors_do_not_stop_the_node(start_node, client):
    start_node("sample_actors:Rough", "sample_actors:Calc", name="tough")
    rough, calc = client.stub("Rough"), client.stub("Calc")
    for kind in ("exit", "interrupt"):
        with pytest.raises(nalar.RemoteError) as ei:
            rough.base_exc(kind).result(30)
        assert ei.value.type in ("SystemExit", "KeyboardInterrupt")
    with pytest.raises(nalar.RemoteError) as ei:
        rough.async_base_exc().result(30)
    assert ei.value.type == "KeyboardInterrupt"
    with pytest.raises(nalar.RemoteError, match="unprintable"):
        rough.unprintable().result(30)
    assert rough.echo("still here").result(30) == "still here"
    assert calc.add(1, 2).result(30) == 3  # the other actors' threads were not stopped either
    (st,) = [s for s in client.status() if s["node"] == "tough"]
    assert st["in_flight"] == 0 and all(i["running"] == 0 for i in st["actors"]["Rough"]["instances"])


def test_a_failing_on_start_fails_the_node_clearly(nats_url, namespace):
    p = NodeProc(["sample_actors:BadBoot", "--nats", nats_url, "--namespace", namespace], node_env())
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        p.wait_ready()
    assert p.proc.wait(30) != 0
    out = "".join(p.output)
    # the user's error and where in their code, in a line: not the runtime's 37-line traceback
    assert "on_start failed: RuntimeError: cannot reach my database (at sample_actors.py:" in out, out
    assert "Traceback" not in out and len(p.output) <= 3, out


def test_stopping_node_answers_its_in_flight_calls(nats_url, namespace, client):
    from conftest import NodeProc

    p = NodeProc(["sample_actors:Gate", "--nats", nats_url, "--namespace", namespace, "--grace", "0.5"], node_env())
    p.wait_ready()
    gate = client.stub("Gate")
    f = gate.options(timeout=120).park(1)
    gate.wait_started(1).result(30)
    p.proc.terminate()  # grace period passes (the call never finishes), then it is answered
    with pytest.raises(nalar.Cancelled, match="stopping"):
        f.result(60)
    assert p.proc.wait(60) == 0


def test_pykka_combinators_give_real_futures(start_node, client):
    start_node("sample_actors:Calc")
    calc = client.stub("Calc")
    m = calc.add(1, 2).map(lambda v: v * 10)
    assert m.result(30) == 30 and m.available()
    done, not_done = nalar.wait([calc.add(1, 1).map(str)], timeout=30)
    assert len(done) == 1 and not not_done
    assert calc.add(1, 1).join(calc.add(2, 2)).result(30) == [2, 4]
    assert nalar.gather([calc.add(0, 5).map(lambda v: v + 1)]).result(30) == [6]
    with pytest.raises(nalar.RemoteError):
        calc.fail("x").map(lambda v: v).result(30)

    async def awaited() -> int:
        return await calc.add(2, 3).map(lambda v: -v)

    assert asyncio.run(awaited()) == -5


def test_cancelled_and_failed_calls_leave_nothing_armed(start_node, client):
    start_node("sample_actors:Gate", "sample_actors:Calc", name="armed")
    gate, calc = client.stub("Gate"), client.stub("Calc")
    parked = [gate.options(timeout=3600).park(i) for i in range(100)]
    gate.wait_started(100).result(30)
    for f in parked:
        assert f.cancel()
    failed = [calc.add(calc.fail("x"), 1) for _ in range(50)]
    for f in failed:
        with pytest.raises(nalar.DependencyFailed):
            f.result(30)
    assert not client.runtime.pending
    wait_for(lambda: len(client.runtime._wheel) == 0, what="client wheel to empty")
    wait_for(lambda: [s for s in client.status() if s["node"] == "armed"][0]["armed_deadlines"] == 0,
             what="node wheel to empty")
    assert client.runtime._wheel.buckets == 0


def test_a_cancelled_sync_call_cannot_start_new_work(start_node, client):
    start_node("sample_actors:Late", "sample_actors:Gate", name="late")
    late, gate = client.stub("Late"), client.stub("Gate")
    f = late.slow_then_call(3.0)  # long enough to be cancelled mid-run even on a loaded machine
    wait_for(lambda: [s for s in client.status() if s["node"] == "late"][0]["actors"]["Late"]["running"] == 1,
             what="the slow call to be running")
    assert f.cancel()
    # the next call to the same sync instance runs after slow_then_call has finished
    assert late.last_child().result(30) == "cancelled"
    assert gate.stats().result(30)["started"] == 0


def test_a_repeated_call_id_joins_the_running_call(start_node, nats_url, namespace, client):
    """A retry that reaches the node still running the original gets the same answer; it runs once."""
    start_node("sample_actors:Gate")

    async def main() -> list[dict]:
        nc = await nats.connect(nats_url)
        body = b'{"m": "park", "a": ["once"]}'
        subject = f"nalar.{namespace}.call.Gate"
        inbox1, inbox2 = nc.new_inbox(), nc.new_inbox()  # nodes answer on inboxes only
        first = await nc.subscribe(inbox1)
        second = await nc.subscribe(inbox2)
        await nc.publish(subject, body, reply=inbox1, headers={"Nalar-Id": "dup-1"})
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, lambda: client.stub("Gate").wait_started(1).result(30))
        await nc.publish(subject, body, reply=inbox2, headers={"Nalar-Id": "dup-1", "Nalar-Attempt": "1"})
        await nc.flush()
        await asyncio.get_running_loop().run_in_executor(None, lambda: client.stub("Gate").release().result(30))
        out = [orjson.loads((await first.next_msg(10)).data), orjson.loads((await second.next_msg(10)).data)]
        await nc.close()
        return out

    assert asyncio.run(main()) == [{"v": "once"}, {"v": "once"}]
    assert client.stub("Gate").stats().result(30)["started"] == 1


def test_client_close_is_idempotent_and_later_calls_fail_clearly(nats_url, namespace):
    c = nalar.connect(nats_url, namespace)
    c.close()
    c.close()
    with pytest.raises(nalar.BusError, match="closed"):
        c.stub("Calc").add(1, 2)
