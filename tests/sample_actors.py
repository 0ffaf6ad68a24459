"""Actors used by the tests; node processes import this module (tests/ is on their PYTHONPATH)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import nalar


class Calc(nalar.Tool):
    def add(self, a: int, b: int) -> int:
        return a + b

    def where(self) -> dict[str, int]:
        return {"pid": os.getpid()}

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def deadline(self) -> float | None:
        return nalar.deadline()

    def session(self) -> str | None:
        return nalar.session()

    def blob(self, n: int) -> str:
        return "x" * n


class Serial(nalar.Tool):
    """A sync tool: counts how many of its calls overlap (must never exceed 1)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.threads: set[str] = set()

    def work(self, i: int) -> int:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        self.threads.add(threading.current_thread().name)
        time.sleep(0.002)  # widen the window in which an overlap would show
        with self.lock:
            self.now -= 1
        return i

    def stats(self) -> dict[str, object]:
        return {"peak": self.peak, "threads": len(self.threads)}


@nalar.hints(max_concurrency=3)
class Limited(nalar.Tool):
    """An async tool limited to 3 concurrent calls per instance."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def work(self, i: int) -> int:
        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.005)
        self.now -= 1
        return i

    async def stats(self) -> dict[str, int]:
        return {"peak": self.peak}


@nalar.hints(max_concurrency=None)
class Gate(nalar.Tool):
    """Async calls that park until released; records cancellations it saw."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.started_event = asyncio.Event()

    async def park(self, x: object = None) -> object:
        self.started += 1
        self.started_event.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return x

    async def wait_started(self, n: int) -> int:
        while self.started < n:
            self.started_event.clear()
            await self.started_event.wait()
        return self.started

    async def release(self) -> bool:
        self.gate.set()
        return True

    async def stats(self) -> dict[str, int]:
        return {"started": self.started, "cancelled": self.cancelled}


class Planner(nalar.Agent):
    """An agent that calls Calc (possibly on another node)."""

    calc = nalar.stub(Calc)
    gate = nalar.stub("Gate")

    def plan(self, a: int, b: int) -> dict[str, object]:
        total = self.calc.add(a, b)
        doubled = self.calc.add(total, total)  # a future as an argument
        return {"value": doubled.result(), "agent_pid": os.getpid(), "tool": self.calc.where().result()}

    def chained(self, a: int, b: int) -> nalar.Future:
        return self.calc.add(a, b)  # returning a future chains it

    def nested_fail(self) -> int:
        return self.calc.fail("deep failure").result()

    def child_deadline(self) -> dict[str, float | None]:
        return {"mine": nalar.deadline(), "child": self.calc.options(timeout=1000).deadline().result()}

    def child_session(self) -> str | None:
        return self.calc.session().result()

    def wait_on_gate(self) -> object:
        return self.gate.park("never").result()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class Rough(nalar.Tool):
    """Misbehaving user code: the node must survive all of it."""

    def echo(self, x: object) -> object:
        return x

    def blob(self, n: int) -> str:
        return "x" * n

    def big_error(self, n: int) -> None:
        raise ValueError("e" * n)

    def base_exc(self, kind: str) -> None:
        raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]

    def unprintable(self) -> None:
        raise _Unprintable()

    async def async_base_exc(self) -> None:
        raise KeyboardInterrupt()


class BadBoot(nalar.Tool):
    def on_start(self) -> None:
        raise RuntimeError("cannot reach my database")

    def ok(self) -> int:
        return 1


class Late(nalar.Agent):
    """A sync agent that keeps working after its call was cancelled, then tries to make a child call."""

    gate = nalar.stub("Gate")

    def __init__(self) -> None:
        self.child = "none"

    def slow_then_call(self, seconds: float) -> object:
        time.sleep(seconds)
        f = self.gate.park("child")
        self.child = "cancelled" if f.cancelled() else "sent"
        return None

    def last_child(self) -> str:
        return self.child


@nalar.hints(stateful=True)
class Counter(nalar.Agent):
    """Session state through managed objects (a sync, stateful agent)."""

    def incr(self, by: int = 1) -> int:
        n = nalar.managed_value("n", 0)
        n.value += by
        return n.value

    def get(self) -> int:
        return nalar.managed_value("n", 0).value

    def incr_then_fail(self) -> None:
        nalar.managed_value("n", 0).value += 100
        raise ValueError("changed my mind")

    def note(self, text: str) -> int:
        notes = nalar.managed_list("notes")
        notes.append(text)
        return len(notes)

    def notes(self) -> list[str]:
        return list(nalar.managed_list("notes"))

    def put_blob(self, n: int) -> int:
        d = nalar.managed_dict("blob")
        d["data"] = "x" * n
        d["sum"] = n
        return n

    def blob(self) -> dict[str, int]:
        d = nalar.managed_dict("blob")
        return {"len": len(d.get("data", "")), "sum": d.get("sum", 0)}

    def where(self) -> int:
        return os.getpid()


@nalar.hints(stateful=True, max_concurrency=None)
class AsyncCounter(nalar.Agent):
    """The same, as async methods."""

    async def incr(self, by: int = 1) -> int:
        n = nalar.managed_value("n", 0)
        await asyncio.sleep(0)
        n.value += by
        return n.value


class NotStateful(nalar.Agent):
    def touch(self) -> int:
        return len(nalar.managed_list("x"))


@nalar.hints(stateful=True)
class SlowCounter(nalar.Agent):
    """A counter whose calls take a few milliseconds, so many are in flight when a node dies."""

    def incr(self) -> int:
        time.sleep(0.004)
        n = nalar.managed_value("n", 0)
        n.value += 1
        return n.value

    def get(self) -> int:
        return nalar.managed_value("n", 0).value


@nalar.hints(stateful=True, max_concurrency=None)
class Ordered(nalar.Agent):
    """Records how many calls of each session overlap, and the order they ran in."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total = 0
        self.total_peak = 0

    async def step(self, i: int) -> int:
        s = nalar.session() or ""
        self.now[s] = self.now.get(s, 0) + 1
        self.peak[s] = max(self.peak.get(s, 0), self.now[s])
        self.total += 1
        self.total_peak = max(self.total_peak, self.total)
        await asyncio.sleep(0.003)
        nalar.managed_list("seen").append(i)
        self.now[s] -= 1
        self.total -= 1
        return i

    async def hold(self, i: int, seconds: float) -> int:
        """Like step, but long: the turn must not pass on while it runs."""
        s = nalar.session() or ""
        self.now[s] = self.now.get(s, 0) + 1
        self.peak[s] = max(self.peak.get(s, 0), self.now[s])
        await asyncio.sleep(seconds)
        nalar.managed_list("seen").append(i)
        self.now[s] -= 1
        return i

    async def seen(self) -> list[int]:
        return list(nalar.managed_list("seen"))

    async def peaks(self) -> dict[str, object]:
        return {"per_session": self.peak, "overall": self.total_peak}


@nalar.hints(stateful=True)
class SelfCaller(nalar.Agent):
    me = nalar.stub("SelfCaller")

    def outer(self) -> int:
        return self.me.inner().result(30)

    def inner(self) -> int:
        return 1


# -- control (tests/test_control.py) -------------------------------------------------------------
# Gates that a test opens through ``GateCtl.release`` (an async tool on the same node), and a log of
# the order in which calls ran, kept per node process.
_GATES: dict[str, threading.Event] = {}
_AGATES: dict[str, asyncio.Event] = {}
_GATES_LOCK = threading.Lock()
_RAN: dict[str, list[object]] = {}


def _gate(name: str) -> threading.Event:
    with _GATES_LOCK:
        return _GATES.setdefault(name, threading.Event())


def _agate(name: str) -> asyncio.Event:
    ev = _AGATES.get(name)
    if ev is None:
        ev = _AGATES[name] = asyncio.Event()
    return ev


def _instance(actor: nalar.Actor) -> str | None:
    """The id of the instance running the current call (for tests that check where calls land): the
    node names each instance it hosts (the call scope says which actor runs a call, not which instance)."""
    return actor._nalar_instance or None


@nalar.hints(max_concurrency=None)
class GateCtl(nalar.Tool):
    """Opens this node's gates and reads what ran here, in order."""

    async def release(self, name: str) -> str | None:
        _gate(name).set()
        _agate(name).set()
        return _instance(self)

    async def ran(self, key: str) -> list[object]:
        return list(_RAN.get(key, []))


class Pin(nalar.Tool):
    """Says which instance ran the call."""

    def where(self) -> str | None:
        return _instance(self)


@nalar.hints(max_concurrency=1)
class Prio(nalar.Tool):
    """An async tool running one call at a time: its queue is where priorities show."""

    async def block(self, gate: str) -> str | None:
        await asyncio.wait_for(_agate(gate).wait(), 60)
        return _instance(self)

    async def step(self, key: str, tag: str) -> str:
        _RAN.setdefault(key, []).append(tag)
        return tag


@nalar.hints(stateful=True)
class Tally(nalar.Agent):
    """A stateful counter (sync: one call at a time per instance) that can be held at a gate."""

    def incr(self) -> dict[str, object]:
        n = nalar.managed_value("n", 0)
        n.value += 1
        return {"n": n.value, "instance": _instance(self)}

    def hold(self, gate: str) -> str | None:
        if not _gate(gate).wait(60):
            raise TimeoutError(f"gate {gate} was never opened")
        return _instance(self)


@nalar.hints(min_instances=1, max_instances=3)
class Scalable(nalar.Tool):
    """Instance counts the policy may change, within 1..3 in all."""

    def where(self) -> str | None:
        return _instance(self)


_STARTS = [0]


@nalar.hints(min_instances=1, max_instances=3)
class SlowStart(nalar.Tool):
    """Instances after a node's first wait in ``on_start`` until the gate "start" opens (a model
    loading its weights, say)."""

    def on_start(self) -> None:
        with _GATES_LOCK:
            _STARTS[0] += 1
            first = _STARTS[0] == 1
        if not first and not _gate("start").wait(60):
            raise TimeoutError("gate start was never opened")

    def where(self) -> str | None:
        return _instance(self)


@nalar.hints(max_concurrency=None)
class Relay(nalar.Agent):
    """Waits at a gate, then calls ``Prio.step``: a later stage of a request that started earlier."""

    prio = nalar.stub(Prio)

    async def later(self, gate: str, key: str, tag: str) -> str:
        await asyncio.wait_for(_agate(gate).wait(), 60)
        return str(await self.prio.step(key, tag))


@nalar.hints(max_concurrency=None)
class Budgeted(nalar.Tool):
    """Prices its calls and holds 10 units at once, as a model actor does with its KV cache
    (``admission_cost``, ``admission_budget``); records the units it ever ran at once."""

    def __init__(self) -> None:
        self.units = 0
        self.peak = 0

    def admission_cost(self, method: str, args: list[object], kwargs: dict[str, object]) -> int:
        return int(args[1]) if method == "hold" else 0  # type: ignore[call-overload]

    def admission_budget(self) -> int:
        return 10

    async def hold(self, gate: str, units: int) -> int:
        self.units += units
        self.peak = max(self.peak, self.units)
        try:
            await asyncio.wait_for(_agate(gate).wait(), 60)
        finally:
            self.units -= units
        return self.peak

    async def most(self) -> int:
        return self.peak


@nalar.hints(stateful=True)
class Ledger(nalar.Agent):
    """An append-only list of tokens per session, for the state drills (tests/test_state_drills.py):
    every acknowledged ``append`` must leave its token in the list exactly once, at the position it returned."""

    def append(self, token: str) -> int:
        tokens = nalar.managed_list("tokens")
        tokens.append(token)
        return len(tokens)

    def tokens(self) -> list[str]:
        return list(nalar.managed_list("tokens"))


# -- errors whose tracebacks could name the host (tests/test_error_privacy.py) ---------------------------
def _leaky_helper(depth: int) -> None:
    """Fails a few frames down, so a traceback has user frames below the method's."""
    if depth > 0:
        _leaky_helper(depth - 1)
        return
    raise ValueError(f"bad depth {depth}")


def _read_config(path: str) -> str:
    with open(path) as f:  # FileNotFoundError: its message holds the absolute path
        return f.read()


class Leaky(nalar.Tool):
    """User code failing in the ways a remote traceback can carry host details: a nested helper, a
    chained cause whose message is an absolute path, a path literal, an exception group."""

    def nested(self) -> None:
        _leaky_helper(2)

    def chained(self, path: str) -> str:
        try:
            return _read_config(path)
        except OSError as e:
            raise RuntimeError("the configuration could not be read") from e

    def literal(self) -> None:
        raise LookupError("nothing at /home/someone/private/notes.txt")

    async def grouped(self) -> None:
        errs: list[Exception] = []
        for depth in (0, 1):
            try:
                _leaky_helper(depth)
            except ValueError as e:
                errs.append(e)
        raise ExceptionGroup("two helpers failed", errs)


@nalar.hints(stateful=True, max_concurrency=None)
class HeldNotes(nalar.Agent):
    """A session's list, whose ``hold`` calls keep their unit's turn until ``release`` is called."""

    def __init__(self) -> None:
        self._gate = asyncio.Event()

    async def note(self, text: str) -> int:
        notes = nalar.managed_list("notes")
        notes.append(text)
        return len(notes)

    async def hold(self, text: str) -> int:
        notes = nalar.managed_list("notes")
        notes.append(text)
        await self._gate.wait()
        return len(notes)

    async def release(self) -> bool:
        self._gate.set()
        return True

    async def notes(self) -> list[str]:
        return list(nalar.managed_list("notes"))


@nalar.hints(max_concurrency=None)
class Work(nalar.Tool):
    """Runs ``ms`` milliseconds; answers the service its program had received when it was called (µs)."""

    async def work(self, ms: float) -> int:
        from nalar.actors.context import current_scope

        scope = current_scope.get()
        await asyncio.sleep(ms / 1000)
        return scope.svc_base if scope is not None else -1


class Program(nalar.Agent):
    """A program of ``Work`` calls: one after another (``chain``), or side by side then one more (``fan``)."""

    work = nalar.stub(Work)

    async def chain(self, ms: list[float]) -> list[int]:
        return [await self.work.work(x) for x in ms]

    async def fan(self, ms: list[float]) -> int:
        await asyncio.gather(*(self.work.work(x) for x in ms))
        return int(await self.work.work(0))
