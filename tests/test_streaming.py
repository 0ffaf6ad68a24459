"""Streaming calls (an ``async def`` that yields): real node processes, items read with ``async for``.

Each item is sent as it is made; the caller reads them in order, none missing and none twice, then the
call's value (the count) or its error. A cancelled reader closes the method's generator where it runs;
a forged item that leaves a gap fails the call instead of handing the reader a stream with a hole.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from conftest import NodeProc, node_env, wait_for

import nalar
from nalar.bus import envelope as env
from nalar.bus.errors import Cancelled, RemoteError, Unavailable


async def _read(fut: Any, upto: int | None = None) -> list[Any]:
    out = []
    async for x in fut:
        out.append(x)
        if upto is not None and len(out) == upto:
            break
    return out


async def test_items_arrive_in_order_all_of_them_and_the_value_is_their_count(start_node: Any,
                                                                                client: nalar.Client) -> None:
    start_node("sample_stream:Ticker")
    t = client.stub("Ticker", timeout=60)
    f = t.count(2000)
    assert await _read(f) == list(range(2000))
    assert await f == 2000
    big = t.count(3, size=200_000)  # items far over one network packet each
    assert [x["i"] for x in await _read(big)] == [0, 1, 2] and await big == 3
    empty = t.count(0)
    assert await _read(empty) == [] and await empty == 0
    # awaited without being read: the value, and the items still there for a reader
    f = t.count(5)
    assert await f == 5 and await _read(f) == [0, 1, 2, 3, 4]
    gate = "g-" + uuid.uuid4().hex
    f2 = t.hold(gate, 4)
    assert await _read(f2, 2) == [0, 1]  # the method waits at its gate now
    first = asyncio.ensure_future(_read(f2))
    await asyncio.sleep(0)  # (lets the first reader start waiting)
    with pytest.raises(RuntimeError, match="one reader at a time"):
        await _read(f2)
    await t.release(gate)
    assert await first == [2, 3] and await f2 == 4


async def test_items_come_while_the_method_still_runs_and_an_error_ends_the_stream(start_node: Any,
                                                                                    client: nalar.Client) -> None:
    start_node("sample_stream:Ticker")
    t = client.stub("Ticker", timeout=60)
    gate = "g-" + uuid.uuid4().hex
    f = t.hold(gate, 10)
    assert await _read(f, 5) == [0, 1, 2, 3, 4]  # the method is stopped at its gate: these came as made
    assert not f.available()
    await t.release(gate)
    assert await _read(f) == [5, 6, 7, 8, 9] and await f == 10

    f = t.broken(10)
    got: list[int] = []
    with pytest.raises(RemoteError, match="broke at 5") as e:
        async for x in f:
            got.append(x)
    assert got == [0, 1, 2, 3, 4] and e.value.type == "ValueError"

    f = t.not_json()
    with pytest.raises(RemoteError, match="cannot cross the bus") as e:
        await _read(f)
    assert e.value.type == "TypeError"


async def test_a_cancelled_stream_closes_the_method_where_it_runs(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_stream:Ticker")
    t = client.stub("Ticker", timeout=60)
    gate = "g-" + uuid.uuid4().hex
    f = t.hold(gate, 10)
    assert await _read(f, 5) == [0, 1, 2, 3, 4]
    f.cancel()
    with pytest.raises(Cancelled):
        await f
    # the generator was closed at its gate (its finally ran) without the gate ever opening
    wait_for(lambda: t.closed(gate).result(10) == 1, what="the method's generator to be closed")


async def test_a_forged_item_that_leaves_a_gap_fails_the_call_and_cancels_it(start_node: Any,
                                                                             client: nalar.Client,
                                                                             nats_url: str) -> None:
    import nats

    start_node("sample_stream:Ticker")
    t = client.stub("Ticker", timeout=60)
    gate = "g-" + uuid.uuid4().hex
    f = t.hold(gate, 10)
    assert await _read(f, 2) == [0, 1]
    rt = client.runtime
    reply = rt._reply_prefix + rt._token(f)
    nc = await nats.connect(nats_url)
    try:
        # a repeat of an item already read is dropped; one far ahead is a gap
        await nc.publish(reply, env.encode_result(1), headers={env.H_ID: f.id, env.H_CHUNK: "1"})
        await nc.publish(reply, env.encode_result(99), headers={env.H_ID: f.id, env.H_CHUNK: "9"})
        await nc.flush()
    finally:
        await nc.close()
    rest: list[int] = []
    with pytest.raises(Unavailable, match="did not arrive"):
        async for x in f:
            rest.append(x)
    assert rest == [2, 3, 4][:len(rest)], rest  # only what the node sent (it stops at 5), in order
    wait_for(lambda: t.closed(gate).result(10) == 1, what="the call to be cancelled where it runs")


async def test_a_node_killed_mid_stream_fails_the_call_and_sends_nothing_twice(start_node: Any,
                                                                              client: nalar.Client) -> None:
    node = start_node("sample_stream:Ticker", name="doomed")
    # a short attempt timeout: the dead node is found out in about 3 s instead of 10 (the default)
    t = client.stub("Ticker", timeout=120, retry=nalar.RetryPolicy(attempt_timeout=3.0))
    f = t.hold("g-" + uuid.uuid4().hex, 10)
    assert await _read(f, 5) == [0, 1, 2, 3, 4]
    start_node("sample_stream:Ticker", name="other")  # a retry would find it: none is made once items came
    node.proc.kill()
    with pytest.raises(Unavailable, match="outcome is unknown"):
        await asyncio.wait_for(_read(f), 60)


def test_a_stateful_actor_cannot_stream(nats_url: str, namespace: str, tmp_path: Any) -> None:
    p = NodeProc(["sample_stream:StatefulStream", "--nats", nats_url, "--namespace", namespace,
                  "--state-dir", str(tmp_path / "s")], node_env())
    with pytest.raises(RuntimeError, match="stateful, so its methods cannot stream"):
        p.wait_ready()
    assert p.proc.wait(30) != 0


async def test_reading_a_plain_call_as_a_stream_is_a_clear_error_and_leaves_its_value(start_node: Any,
                                                                                       client: nalar.Client) -> None:
    start_node("sample_stream:Ticker")
    t = client.stub("Ticker", timeout=60)
    f = t.closed("nobody")
    with pytest.raises(TypeError, match="not a streaming method"):
        await _read(f)
    assert await f == 0  # its value is untouched
    done = t.closed("nobody")
    assert await done == 0
    with pytest.raises(TypeError, match="not a streaming method"):
        await _read(done)


async def test_a_stream_that_sent_items_is_not_preempted(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_stream:SlowStream")
    s = client.stub("SlowStream", timeout=60, priority=0)
    f = s.tick(6, 0.1)
    assert await _read(f, 1) == [0]
    quick = client.stub("SlowStream", timeout=60, priority=9).quick()
    assert await _read(f) == [1, 2, 3, 4, 5] and await f == 6  # one run: no item twice, none from a re-run
    assert await quick == "quick"
    st = [n for n in client.status(5.0) if "SlowStream" in n.get("actors", {})][0]
    assert st["counters"].get("preempted", 0) == 0, st["counters"]
