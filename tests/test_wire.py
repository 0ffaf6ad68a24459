"""The wire schema, each part from its one owner: call headers (``CallMeta``), the error form, the
payload-size rule, the call scope children inherit, and a call with future arguments encoded once."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import nalar
from nalar.bus import envelope as env
from nalar.bus import errors as E
from nalar.bus.transport import LocalTransport
from nalar.actors.context import CallScope, current_scope
from nalar.actors.runtime import Runtime

# -- call headers -----------------------------------------------------------------------------------


def test_call_meta_round_trips_through_headers() -> None:
    m = env.CallMeta("p-1", "root", "s1", "p-0", 1234.5678, 3, 2, 4, 1_700_000_000_000_000, "node-a",
                     "00-" + "1" * 32 + "-" + "2" * 16 + "-01", 1_500_000)
    h = m.to_headers()
    assert h == {env.H_ID: "p-1", env.H_REQ: "root", env.H_SESSION: "s1", env.H_PARENT: "p-0",
                 env.H_DEADLINE: "1234.568", env.H_PRIORITY: "3", env.H_ATTEMPT: "2", env.H_STAGE: "4",
                 env.H_BORN: "1700000000000000", env.H_FWD: "node-a", env.H_TRACEPARENT: m.traceparent,
                 env.H_SVC: "1500000"}
    back = env.CallMeta.from_headers(h)
    for f in env.CallMeta.__slots__:
        assert getattr(back, f) == (1234.568 if f == "deadline" else getattr(m, f)), f


def test_call_meta_leaves_defaults_out_and_restores_them() -> None:
    assert env.CallMeta("a").to_headers() == {env.H_ID: "a"}
    assert env.CallMeta("a", request="a", attempt=0).to_headers() == {env.H_ID: "a", env.H_ATTEMPT: "0"}
    m = env.CallMeta.from_headers({env.H_ID: "a"})
    assert (m.id, m.request, m.session, m.parent, m.deadline, m.priority, m.attempt, m.stage, m.born, m.fwd,
            m.traceparent) == ("a", "a", None, None, 0.0, 0, -1, 0, 0, None, None)


@pytest.mark.parametrize("headers,why", [
    (None, "no headers"),
    ({}, "no headers"),
    ({env.H_ID: ""}, "Nalar-Id"),
    ({env.H_ID: "x" * 129}, "Nalar-Id"),
    ({env.H_ID: "a", env.H_DEADLINE: "soon"}, "non-numeric"),
    ({env.H_ID: "a", env.H_DEADLINE: "inf"}, "finite"),
    ({env.H_ID: "a", env.H_DEADLINE: "nan"}, "finite"),
    ({env.H_ID: "a", env.H_DEADLINE: "-1"}, "finite"),
    ({env.H_ID: "a", env.H_PRIORITY: "1.5"}, "non-numeric"),
    ({env.H_ID: "a", env.H_ATTEMPT: "x"}, "non-numeric"),
    ({env.H_ID: "a", env.H_STAGE: "x"}, "non-numeric"),
    ({env.H_ID: "a", env.H_BORN: "x"}, "non-numeric"),
    ({env.H_ID: "a", env.H_SVC: "x"}, "non-numeric"),
    ({env.H_ID: "a", env.H_SVC: "-1"}, "out of range"),
    ({env.H_ID: "a", env.H_SVC: str(env.MAX_SVC + 1)}, "out of range"),
    ({env.H_ID: "a", env.H_SVC: "0" * 30 + "1"}, "out of range"),
])
def test_call_meta_rejects_bad_headers_with_a_reason(headers: dict[str, str] | None, why: str) -> None:
    with pytest.raises(E.MalformedMessage, match=why):
        env.CallMeta.from_headers(headers)
    with pytest.raises(E.MalformedMessage, match=why):
        env.decode_call(b'{"m":"x"}', headers, "")


def test_decode_call_keeps_the_body_it_came_with() -> None:
    data = env.encode_call("m", [b"\x00"], {})
    c = env.decode_call(data, {env.H_ID: "f"}, "r")
    assert type(c) is env.CallMessage and c.data is data and c.args == [b"\x00"] and c.meta.id == "f"


# -- errors -----------------------------------------------------------------------------------------

_OWN = [E.UnknownActor, E.UnknownMethod, E.BadRequest, E.DeadlineExceeded, E.Cancelled, E.Overloaded,
        E.DependencyFailed, E.Unavailable, E.StateError, E.StateFull, E.Conflict]


@pytest.mark.parametrize("cls", _OWN)
def test_nalar_errors_round_trip_by_kind(cls: type[Any]) -> None:
    e = cls("it failed", actor="A", method="m", traceback="tb", chain=[{"kind": "error", "type": "X"}], future_id="f-1")
    assert e.type == cls.__name__ and isinstance(e, E.RemoteError)
    w = e.to_wire()
    assert w["kind"] == cls.kind
    typed = cls("x", type="TypeError")  # a BadRequest for a TypeError, say
    assert typed.type == "TypeError" and type(E.from_wire(typed.to_wire())) is cls
    back = E.from_wire(w)
    assert type(back) is cls
    assert (back.type, back.message, back.actor, back.method, back.traceback, back.chain, back.future_id) == (
        cls.__name__, "it failed", "A", "m", "tb", [{"kind": "error", "type": "X"}], "f-1")


def test_kinds_are_unique_and_the_base_keeps_the_remote_type() -> None:
    assert len({c.kind for c in _OWN + [E.RemoteError]}) == len(_OWN) + 1
    e = E.RemoteError("KeyError", "'k'", "A", "m", "tb", [], "f")
    back = E.from_wire(e.to_wire())
    assert type(back) is E.RemoteError and back.type == "KeyError" and back.future_id == "f"
    assert issubclass(E.DeadlineExceeded, TimeoutError) and issubclass(E.UnknownMethod, AttributeError)
    assert not issubclass(E.MalformedMessage, E.RemoteError)


def test_from_wire_tolerates_missing_keys_and_unknown_kinds() -> None:
    e = E.from_wire({})
    assert type(e) is E.RemoteError and (e.type, e.message, e.chain) == ("Exception", "", [])
    assert type(E.from_wire({"kind": "no-such-kind", "message": "m"})) is E.RemoteError
    assert E.from_wire({"kind": "cancelled", "chain": "not a list"}).chain == []


def test_user_exceptions_go_on_the_wire_with_traceback_and_chain() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as ex:
        w = E.to_wire(ex, "A", "m", "f-1")
    assert (w["kind"], w["type"], w["message"], w["actor"], w["method"], w["chain"], w["future_id"]) == (
        "error", "ValueError", "bad value", "A", "m", [], "f-1")
    assert "raise ValueError" in w["traceback"]

    inner = E.Cancelled("stopped", actor="B", method="n", chain=[{"kind": "deadline"}], future_id="f-0")
    w = E.to_wire(inner, "A", "m", "f-1")  # a nested call's error that the method let through
    assert (w["kind"], w["type"], w["message"], w["actor"]) == ("error", "Cancelled", "stopped", "A")
    assert w["chain"] == [inner.to_wire(), {"kind": "deadline"}]
    assert type(E.from_wire(w)) is E.RemoteError

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    w = E.to_wire(Unprintable(), "A", "m", "f")
    assert w["message"].startswith("<unprintable") and w["type"].endswith("Unprintable")


# -- the payload-size rule --------------------------------------------------------------------------


def test_fits_counts_headers_as_the_server_does() -> None:
    h = {env.H_ID: "f-1"}
    hs = env.header_size(h)
    assert hs == 12 + 4 + len(env.H_ID) + 3
    assert env.fits(b"x" * 10**9, h, 0)  # 0: no limit
    limit = 10 * env.HEADER_ALLOWANCE
    assert env.fits(b"x" * (limit - hs), h, limit)
    assert not env.fits(b"x" * (limit - hs + 1), h, limit)
    assert env.fits(b"x" * limit, None, limit) and not env.fits(b"x" * (limit + 1), None, limit)
    assert env.fits(b"x" * (limit - env.HEADER_ALLOWANCE), {"k": "v" * (2 * env.HEADER_ALLOWANCE)}, limit)
    env.check_size(b"x" * (limit - hs), h, limit, "the call")
    with pytest.raises(E.PayloadTooLarge, match="the call is") as ei:
        env.check_size(b"x" * (limit - hs + 1), h, limit, "the call")
    assert (ei.value.size, ei.value.limit) == (limit + 1, limit)


def test_the_local_bus_applies_the_same_rule() -> None:
    async def main() -> None:
        bus = LocalTransport(max_payload=10_000)
        h = {env.H_ID: "f"}
        await bus.publish("x", b"x" * (10_000 - env.header_size(h)), h)
        with pytest.raises(E.PayloadTooLarge):
            await bus.publish("x", b"x" * (10_001 - env.header_size(h)), h)

    asyncio.run(main())


# -- the call scope ---------------------------------------------------------------------------------


def _with_runtime(body: Any) -> Any:
    """Run ``body(rt, sent)`` on a runtime over the local bus; ``sent`` collects the calls' headers."""
    async def main() -> Any:
        rt = Runtime(LocalTransport(), "wire", name="t")
        await rt.start()
        sent: list[dict[str, str]] = []
        await rt.transport.subscribe("nalar.wire.call.>", lambda s, r, d, h: sent.append(dict(h or {})))
        try:
            return await body(rt, sent)
        finally:
            await rt.close()

    return asyncio.run(main())


def test_a_child_call_inherits_only_from_the_scope() -> None:
    async def body(rt: Runtime, sent: list[dict[str, str]]) -> None:
        dl = time.time() + 5
        scope = CallScope("p-1", "root-1", "s1", 7, dl, 2, 123, "Agent", True, None)
        token = current_scope.set(scope)
        try:
            a = rt.call("Tool", "m", (1,), {}, timeout=60)
            b = rt.call("Tool", "m", (), {}, session=None, priority=1, retry=nalar.NO_RETRY)
            own = rt.call("Agent", "m", (), {})  # its own actor in its own session: would wait for itself
            other = rt.call("Agent", "m", (), {}, session="s2")
            scope.closed = True
            late = rt.call("Tool", "m", (), {})
        finally:
            current_scope.reset(token)
        await asyncio.sleep(0.05)
        assert scope.children == [a, b, own, other]
        ha, hb, ho = sent
        assert ha == {env.H_ID: a.id, env.H_REQ: "root-1", env.H_PARENT: "p-1", env.H_STAGE: "3",
                      env.H_BORN: "123", env.H_DEADLINE: f"{dl:.3f}", env.H_SESSION: "s1", env.H_PRIORITY: "7",
                      env.H_ATTEMPT: "0"}
        assert (hb[env.H_STAGE], hb[env.H_PRIORITY]) == ("4", "1")
        assert env.H_SESSION not in hb and env.H_ATTEMPT not in hb
        assert ho[env.H_SESSION] == "s2" and ho[env.H_STAGE] == "6"
        assert isinstance(own.exception(1), nalar.BadRequest)
        assert isinstance(late.exception(1), nalar.Cancelled)
        for f in (a, b, other):
            f.cancel()

    _with_runtime(body)


def test_a_root_call_has_its_own_request_and_birth() -> None:
    async def body(rt: Runtime, sent: list[dict[str, str]]) -> None:
        f = rt.call("Tool", "m", (), {}, session="s", timeout=10)
        await asyncio.sleep(0.05)
        (h,) = sent
        assert set(h) == {env.H_ID, env.H_BORN, env.H_DEADLINE, env.H_SESSION, env.H_ATTEMPT}
        assert abs(int(h[env.H_BORN]) / 1e6 - time.time()) < 5
        f.cancel()

    _with_runtime(body)


# -- a call with future arguments is encoded once ---------------------------------------------------


class Maker(nalar.Tool):
    async def make(self, delay: float, value: Any) -> Any:
        await asyncio.sleep(delay)
        return value


class Echo(nalar.Tool):
    async def echo(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"a": list(args), "k": kwargs}


def test_a_call_with_future_arguments_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[str] = []
    tagged = env._tagged

    def counting(body: dict[str, Any], enc: env.Encoder) -> bytes:
        if "m" in body:
            encoded.append(body["m"])
        return tagged(body, enc)

    monkeypatch.setattr(env, "_tagged", counting)
    fill, fills = env.Template.fill, []

    def counting_fill(self: env.Template, values: list[tuple[bytes, Any]]) -> bytes:
        fills.append(len(values))
        return fill(self, values)

    monkeypatch.setattr(env.Template, "fill", counting_fill)
    first = {"raw": b"\x00\xff", "nested": [b"x", {"deep": [1, b"y", None]}], "$bytes?": "no"}
    with nalar.local(Maker, Echo) as app:
        maker, echo = app.stub(Maker), app.stub(Echo)
        f1 = maker.make(0.3, first)
        f2 = maker.make(0.2, [b"z", "two"])
        done = maker.make(0, "ready")
        assert done.result(10) == "ready"
        assert not f1.done() and not f2.done()
        out = echo.echo(f1, b"own", [f2, {"x": f1}], done, k=f2).result(10)
        plain = echo.echo(f1, [f2]).result(10)  # both finished by now: no dependencies
    assert out == {"a": [first, b"own", [[b"z", "two"], {"x": first}], "ready"], "k": {"k": [b"z", "two"]}}
    assert plain == {"a": [first, [[b"z", "two"]]], "k": {}}
    assert encoded.count("echo") == 2 and encoded.count("make") == 3  # once per call
    assert fills == [2]  # the first echo's two pending futures, spliced in once they had values


def test_a_filled_body_decodes_like_one_encoded_whole() -> None:
    class Slot:
        def __init__(self, name: str) -> None:
            self.name = name

    class Enc(env.Encoder):
        def __call__(self, obj: Any) -> Any:
            return obj.name if isinstance(obj, Slot) else super().__call__(obj)

    value = {"b": [b"\x01", {"c": b"\x02"}], "n": 1}
    for own in ([b"own"], ["no bytes"]):
        enc = Enc()
        data = env.encode_call("m", [Slot("$p0"), own, [Slot("$p0")], Slot("$p1")], {}, enc)
        t = env.Template(data, enc.n_bytes)
        filled = t.fill([(b'"$p0"', value), (b'"$p1"', "plain")])
        assert filled == env.encode_call("m", [value, own, [value], "plain"], {})
        assert env.decode_call(filled, {env.H_ID: "f"}, "").args == [value, own, [value], "plain"]
    enc = Enc()
    t = env.Template(env.encode_call("m", [{"$bytes": "aGk="}, Slot("$p")], {}, enc), enc.n_bytes)
    with pytest.raises(TypeError, match="reserved"):
        t.fill([(b'"$p"', b"raw")])


@pytest.mark.parametrize("name,value", [(env.H_REQ, "r" * 129), (env.H_PARENT, "p" * 129), (env.H_FWD, "n" * 129),
                                        (env.H_SESSION, "s" * 257), (env.H_TRACEPARENT, "t" * 129)])
def test_call_headers_are_bounded_so_a_forward_always_fits(name: str, value: str) -> None:
    with pytest.raises(E.MalformedMessage, match="over"):
        env.CallMeta.from_headers({env.H_ID: "f-1", name: value})
    env.CallMeta.from_headers({env.H_ID: "f-1", name: value[:-1]})  # at the bound: accepted
