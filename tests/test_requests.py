"""Control requests and scatter/gather (``Runtime.request``/``scatter``) over the runtime's one reply
subscription, against a real nats-server and in local mode."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import pytest

from nalar.actors.runtime import Runtime
from nalar.bus import envelope as env
from nalar.bus.connection import ConnectOptions, open_connection
from nalar.bus.errors import MalformedMessage, StateError, UnknownActor, UnknownMethod
from nalar.bus.transport import LocalTransport, NatsTransport, is_no_responders

Responder = Callable[[str, str, bytes, "dict[str, str] | None"], None]


@pytest.fixture(params=["nats", "local"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(mode: str, nats_url: str | None, namespace: str,
        body: Callable[[Runtime], Awaitable[Any]]) -> Any:
    """Run ``body(rt)`` on a fresh runtime (NATS or in-process); it must leave no request entry behind."""
    async def main() -> Any:
        if mode == "nats":
            assert nats_url is not None
            rt = Runtime(NatsTransport(await open_connection(ConnectOptions.resolve(nats_url, name="t"))),
                         namespace, name="t")
        else:
            rt = Runtime(LocalTransport(), namespace, name="t")
        await rt.start()
        try:
            out = await body(rt)
            assert rt._requests == {}
            return out
        finally:
            await rt.close()

    return asyncio.run(main())


@pytest.fixture
def url(mode: str, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("nats_url")) if mode == "nats" else None


async def serve(rt: Runtime, subject: str, handler: Responder) -> None:
    await rt.transport.subscribe(subject, handler)
    await rt.transport.flush()


def test_request_answered(mode, url, namespace):
    subject = f"nalar.{namespace}.node.echo"

    async def body(rt: Runtime) -> None:
        await serve(rt, subject, lambda s, reply, data, h: rt.send(reply, env.encode_result({"got": env.loads(data)})))
        assert await rt.request(subject, {"op": "ping"}) == {"got": {"op": "ping"}}
        assert await rt.request(subject, b'{"raw":1}', 5) == {"got": {"raw": 1}}

    run(mode, url, namespace, body)


def test_error_reply_raises_its_remote_error_subclass(mode, url, namespace):
    subject = f"nalar.{namespace}.node.err"
    errors = {"method": UnknownMethod("no method nope", actor="A", method="nope"), "state": StateError("the store is gone")}

    async def body(rt: Runtime) -> None:
        await serve(rt, subject, lambda s, reply, data, h: rt.send(
            reply, env.encode_error(errors[env.loads(data)["which"]].to_wire())))
        with pytest.raises(UnknownMethod) as ei:
            await rt.request(subject, {"which": "method"})
        assert ei.value.message == "no method nope" and ei.value.actor == "A" and ei.value.method == "nope"
        with pytest.raises(StateError, match="the store is gone"):
            await rt.request(subject, {"which": "state"})

    run(mode, url, namespace, body)


def test_a_reply_that_is_not_one_is_malformed(mode, url, namespace):
    subject = f"nalar.{namespace}.node.bad"

    async def body(rt: Runtime) -> None:
        await serve(rt, subject, lambda s, reply, data, h: rt.send(reply, b"not json"))
        with pytest.raises(MalformedMessage):
            await rt.request(subject, {})

    run(mode, url, namespace, body)


def test_no_responders_is_unknown_actor(mode, url, namespace):
    async def body(rt: Runtime) -> None:
        t0 = time.monotonic()
        with pytest.raises(UnknownActor, match="nobody listens"):
            await rt.request(f"nalar.{namespace}.node.nobody", {}, 10)
        assert time.monotonic() - t0 < 5  # answered at once, not by the timeout
        seen: list[tuple[bytes, Any]] = []

        def note(d: bytes, h: Any) -> bool:
            seen.append((d, h))
            return True

        await rt.scatter(f"nalar.{namespace}.node.nobody", {}, note, 10)
        assert len(seen) == 1 and is_no_responders(*seen[0])

    run(mode, url, namespace, body)


def test_timeout_leaves_no_entry_and_a_late_reply_is_counted(mode, url, namespace):
    subject = f"nalar.{namespace}.node.slow"
    held: list[str] = []

    async def body(rt: Runtime) -> None:
        await serve(rt, subject, lambda s, reply, data, h: held.append(reply))
        with pytest.raises(asyncio.TimeoutError):
            await rt.request(subject, {}, 0.2)
        assert rt._requests == {} and len(held) == 1
        late = rt.counters["late_replies"]
        rt.send(held[0], env.encode_result("too late"))
        await rt.flush_out()
        for _ in range(100):
            if rt.counters["late_replies"] > late:
                break
            await asyncio.sleep(0.02)
        assert rt.counters["late_replies"] == late + 1
        assert not rt.malformed

    run(mode, url, namespace, body)


def test_scatter_gathers_until_quiet(mode, url, namespace):
    subject = f"nalar.{namespace}.status"

    async def body(rt: Runtime) -> None:
        loop = asyncio.get_running_loop()
        for i, delay in enumerate((0.0, 0.05, 0.1, 3.0)):  # the last one comes long after the others
            def later(s: str, reply: str, data: bytes, h: Any, i: int = i, delay: float = delay) -> None:
                loop.call_later(delay, rt.send, reply, env.encode_result({"node": i}))
            await rt.transport.subscribe(subject, later)
        await rt.transport.flush()
        got: list[int] = []
        t0 = time.monotonic()
        def count(d: bytes, h: Any) -> bool:
            got.append(env.decode_reply(d)[1]["node"])
            return False  # counted: the quiet spell starts with the first one

        await rt.scatter(subject, b"{}", count, 10, quiet=0.5)
        assert sorted(got) == [0, 1, 2]
        assert time.monotonic() - t0 < 2.5  # ended by the quiet spell, not by the timeout
        late = rt.counters["late_replies"]
        for _ in range(200):
            if rt.counters["late_replies"] > late:
                break
            await asyncio.sleep(0.05)
        assert rt.counters["late_replies"] == late + 1 and got == sorted(got)

    run(mode, url, namespace, body)


def test_scatter_ends_when_on_says_so_and_on_errors_propagate(mode, url, namespace):
    subject = f"nalar.{namespace}.metrics"

    async def body(rt: Runtime) -> None:
        for i in range(3):
            def answer(s: str, reply: str, data: bytes, h: Any, i: int = i) -> None:
                rt.send(reply, env.dumps({"n": i}))
            await rt.transport.subscribe(subject, answer)
        await rt.transport.flush()
        got: list[Any] = []
        t0 = time.monotonic()

        def two(d: bytes, h: Any) -> bool:
            got.append(env.loads(d))
            return len(got) == 2

        await rt.scatter(subject, {}, two, 10)
        assert len(got) == 2 and time.monotonic() - t0 < 5

        def boom(d: bytes, h: Any) -> None:
            raise ValueError("bad reply")

        with pytest.raises(ValueError, match="bad reply"):
            await rt.scatter(subject, {}, boom, 10)
        assert rt._requests == {}
        await rt.scatter(subject, {}, lambda d, h: None, 0)  # timeout 0: publish, do not wait

    run(mode, url, namespace, body)


def test_scatter_passes_headers_of_a_chunked_stream(mode, url, namespace):
    subject = f"nalar.{namespace}.node.holder"
    chunks = [b"part0", b"part1", b"part2"]

    def stream(rt: Runtime) -> Responder:
        def on(s: str, reply: str, data: bytes, h: Any) -> None:
            for i, c in enumerate(chunks):
                rt.send(reply, c, {"Nalar-Seq": str(i), "Nalar-Total": str(len(chunks))})
        return on

    async def body(rt: Runtime) -> None:
        await serve(rt, subject, stream(rt))
        parts: dict[int, bytes] = {}

        def on(data: bytes, headers: dict[str, str] | None) -> bool:
            assert headers is not None
            parts[int(headers["Nalar-Seq"])] = data
            return len(parts) == int(headers["Nalar-Total"])

        await rt.scatter(subject, {"op": "export"}, on, 10)
        assert [parts[i] for i in range(len(chunks))] == chunks

    run(mode, url, namespace, body)


def test_concurrent_requests_interleave(mode, url, namespace):
    subject = f"nalar.{namespace}.node.mixed"
    n = 200

    async def body(rt: Runtime) -> None:
        held: list[tuple[str, Any]] = []

        def on(s: str, reply: str, data: bytes, h: Any) -> None:  # answer in reverse order, once all arrived
            held.append((reply, env.loads(data)["i"]))
            if len(held) == n:
                for r, i in reversed(held):
                    rt.send(r, env.encode_result(i * 10))

        await serve(rt, subject, on)
        calls = [rt.request(subject, {"i": i}, 20) for i in range(n)]
        gathered: list[Any] = []

        def gather(d: bytes, h: Any) -> bool:
            gathered.append(d)
            return True

        other = rt.scatter(f"nalar.{namespace}.nobody", {}, gather, 20)
        out = await asyncio.gather(*calls, other)
        assert out[:n] == [i * 10 for i in range(n)]
        assert gathered == [b""]  # no responders for the scatter, answers for every request

    run(mode, url, namespace, body)


def test_jetstream_capability(nats_url, namespace):
    from nalar.bus import kv as bkv
    from nalar.state.log import JetStreamLog

    assert LocalTransport().jetstream() is None

    async def main() -> None:
        t = NatsTransport(await open_connection(ConnectOptions.resolve(nats_url, name="t")))
        try:
            js = t.jetstream()
            assert js is not None and t.jetstream() is js
            log = await JetStreamLog.open(js, t.nc, namespace)
            assert log.replicas == 1  # a single server: what it can give
            assert (await JetStreamLog.open(js, t.nc, namespace)).stream == log.stream  # opened, not re-created
            assert await log.last(b"s\x00A") is None
            assert await bkv.open_bucket(js, bkv.policy_bucket(namespace), "policy", create=False) is None
            assert await bkv.open_bucket(js, bkv.policy_bucket(namespace), "policy") is not None
        finally:
            await t.close()

    asyncio.run(main())
