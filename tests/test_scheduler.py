"""The node's scheduler in-process: queues, priorities, late binding and admission budgets, no bus.

Each test builds a ``Scheduler`` over real ``ActorGroup``/``Instance`` records and a real
``DecisionTable``; the ``start`` callback records bindings and plays the executor's part (a slot is
taken when a call starts, freed by ``finish``, which pumps the next call as the executor does).
"""
from __future__ import annotations

from typing import Any

import nalar
from nalar.actors.control import DecisionTable
from nalar.actors.hints import hints_of
from nalar.actors.node.calls import ActorGroup, Book, Call, Instance
from nalar.actors.node.queues import Scheduler, heap_top
from nalar.bus.envelope import CallMeta


class Echo(nalar.Tool):
    async def m(self, x: Any = None) -> Any:
        return x


class Blocking(nalar.Tool):
    def m(self, x: Any = None) -> Any:
        return x


class Priced(nalar.Model):
    """A budgeted actor: each call costs its first argument, and an instance holds 10 at once."""

    async def gen(self, n: int) -> int:
        return n

    def admission_cost(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> int:
        return int(args[0])

    def admission_budget(self) -> int:
        return 10


class Rig:
    """A scheduler with one actor group of ``n`` instances, each with ``limit`` slots."""

    def __init__(self, cls: type, n: int = 1, limit: int | None = 1) -> None:
        self.book = Book("n1", "boot")
        self.table = DecisionTable(here="n1")
        self.started: list[tuple[str, str]] = []  # (instance, call id) in start order
        self.calls: dict[str, Call] = {}  # every call started, by id
        self.sched = Scheduler(self.book, self.table, self.start)
        self.g = ActorGroup(cls, hints_of(cls))
        for i in range(n):
            inst = Instance(f"{self.g.name}-n1-{i}", self.g, cls(), limit)
            self.g.instances.append(inst)
            self.book.instances[inst.id] = inst
        self.book.groups[self.g.name] = self.g
        self.ver = 0

    @property
    def insts(self) -> list[Instance]:
        return self.g.instances

    def start(self, inst: Instance, c: Call) -> None:
        c.inst = inst
        inst.running += 1
        if c.cost > 0:
            inst.spent += c.cost
        if not self.g.methods[c.method]:
            inst.sync_running += 1
        self.started.append((inst.id, c.id))
        self.calls[c.id] = c

    def finish(self, c: Call) -> None:
        inst = c.inst
        assert inst is not None
        inst.running -= 1
        if c.cost > 0:
            inst.spent -= c.cost
        if not self.g.methods[c.method]:
            inst.sync_running -= 1
        self.sched.pump(inst)

    def call(self, fid: str, method: str = "m", args: list[Any] | None = None, **meta: Any) -> Call:
        c = Call()
        c.meta = CallMeta(fid, **meta)
        c.method = method
        c.args = args or []
        c.kwargs = {}
        c.reply = ""
        c.data = None
        c.group = self.g
        return c

    def decide(self, *ops: list[Any]) -> None:
        self.ver += 1
        assert self.table.apply({"v": self.ver, "prev": self.ver - 1, "ops": list(ops)}) is not None

    def order(self) -> list[str]:
        return [fid for _, fid in self.started]


def test_a_free_instance_takes_a_call_at_once_and_a_busy_one_queues_it() -> None:
    r = Rig(Echo)
    a, b = r.call("a"), r.call("b")
    r.sched.enqueue(a)
    r.sched.enqueue(b)
    assert r.order() == ["a"]
    assert (r.g.queued, r.g.shared) == (1, 1)
    r.finish(a)
    assert r.order() == ["a", "b"]
    assert (r.g.queued, r.g.shared) == (0, 0)


def test_queue_order_is_priority_then_request_age_then_arrival() -> None:
    r = Rig(Echo)
    r.sched.enqueue(r.call("busy"))
    r.sched.enqueue(r.call("new-req", born=300))
    r.sched.enqueue(r.call("old-req", born=100))
    r.sched.enqueue(r.call("urgent", priority=5, born=900))
    r.sched.enqueue(r.call("old-req-2", born=100))
    for fid in ["busy", "urgent", "old-req", "old-req-2"]:
        r.finish(r.calls[fid])
    assert r.order() == ["busy", "urgent", "old-req", "old-req-2", "new-req"]


def test_sticky_binding_is_plain_fifo_whatever_the_request_age() -> None:
    r = Rig(Echo)
    r.decide(["sticky", r.g.name, [r.insts[0].id]], ["instance", r.insts[0].id, "n1"])
    r.sched.enqueue(r.call("busy"))
    r.sched.enqueue(r.call("young", born=900))
    r.sched.enqueue(r.call("old", born=100))
    r.finish(r.calls["busy"])
    r.finish(r.calls["young"])
    assert r.order() == ["busy", "young", "old"]


def test_new_priorities_reorder_queued_calls_but_keep_arrival_order_among_equals() -> None:
    r = Rig(Echo)
    r.sched.enqueue(r.call("busy"))
    for fid, s in [("s1-a", "s1"), ("s2-a", "s2"), ("s1-b", "s1"), ("s2-b", "s2")]:
        r.sched.enqueue(r.call(fid, session=s, born=100))
    r.decide(["priority", "s2", 7, None])
    r.sched.reprioritise({"s2"})
    for fid in ["busy", "s2-a", "s2-b", "s1-a"]:
        r.finish(r.calls[fid])
    assert r.order() == ["busy", "s2-a", "s2-b", "s1-a", "s1-b"]


def test_a_routed_session_waits_for_its_instance_while_another_is_free() -> None:
    r = Rig(Echo, n=2)
    i0, i1 = r.insts
    r.decide(["instance", i0.id, "n1"], ["instance", i1.id, "n1"], ["route", "s", r.g.name, i0.id])
    r.sched.enqueue(r.call("s-1", session="s"))
    r.sched.enqueue(r.call("s-2", session="s"))
    r.sched.enqueue(r.call("other"))
    assert r.started == [(i0.id, "s-1"), (i1.id, "other")]
    assert (i0.queued, r.g.shared) == (1, 0)
    r.finish(r.calls["other"])  # i1 is free, but s-2 is routed to i0: it keeps waiting
    assert r.order() == ["s-1", "other"]
    r.finish(r.calls["s-1"])
    assert r.started[-1] == (i0.id, "s-2")


def test_a_lookup_made_by_the_caller_is_used_as_is() -> None:
    r = Rig(Echo, n=2)
    i0, i1 = r.insts
    r.decide(["instance", i0.id, "n1"], ["route", "s", r.g.name, i0.id])
    r.sched.enqueue(r.call("s-1", session="s"), (i1.id, True))  # the lookup intake made, not repeated
    assert r.started == [(i1.id, "s-1")]


def test_weights_steer_unrouted_calls_and_weight_zero_is_only_a_fallback() -> None:
    r = Rig(Echo, n=2, limit=4)
    i0, i1 = r.insts
    r.decide(["instance", i0.id, "n1"], ["instance", i1.id, "n1"], ["weights", r.g.name, {i0.id: 0.0, i1.id: 1.0}])
    r.sched.set_weights(r.g)
    for k in range(4):
        r.sched.enqueue(r.call(f"c{k}"))
    assert {i for i, _ in r.started} == {i1.id}  # i1 takes all it has room for
    r.sched.enqueue(r.call("spill"))
    assert r.started[-1] == (i0.id, "spill")  # i1 is full: the weight-0 instance is the fallback


def test_an_admission_budget_holds_calls_back_but_always_lets_one_in() -> None:
    r = Rig(Priced, n=1, limit=None)
    r.sched.enqueue(r.call("big", "gen", [25]))  # over the whole budget, but alone: it runs
    r.sched.enqueue(r.call("six", "gen", [6]))
    assert r.order() == ["big"]
    r.finish(r.calls["big"])
    r.sched.enqueue(r.call("four", "gen", [4]))
    r.sched.enqueue(r.call("one", "gen", [1]))
    assert r.order() == ["big", "six", "four"]  # 6 + 4 = 10 fits; 11 would not
    assert r.insts[0].spent == 10
    r.finish(r.calls["four"])
    assert r.order()[-1] == "one"


def test_a_sync_instance_runs_one_call_at_a_time() -> None:
    r = Rig(Blocking, n=1, limit=None)
    r.sched.enqueue(r.call("a"))
    r.sched.enqueue(r.call("b"))
    assert r.order() == ["a"]
    r.finish(r.calls["a"])
    assert r.order() == ["a", "b"]


def test_a_draining_instance_gives_its_routed_calls_back_in_their_place() -> None:
    r = Rig(Echo, n=2)
    i0, i1 = r.insts
    r.decide(["instance", i0.id, "n1"], ["instance", i1.id, "n1"], ["route", "s", r.g.name, i0.id])
    r.sched.enqueue(r.call("busy0", session="s"))
    r.sched.enqueue(r.call("busy1"))
    r.sched.enqueue(r.call("s-2", session="s", born=50))
    r.sched.enqueue(r.call("plain", born=60))
    i0.draining = True
    r.sched.requeue_shared(i0)
    assert (i0.queued, r.g.shared, r.g.queued) == (0, 2, 2)
    r.finish(r.calls["busy1"])
    r.finish(r.calls["s-2"])
    assert r.order() == ["busy0", "busy1", "s-2", "plain"]


def test_unqueue_takes_a_call_out_and_first_reports_the_head_of_every_queue() -> None:
    r = Rig(Echo, n=2)
    i0, i1 = r.insts
    r.decide(["instance", i0.id, "n1"], ["route", "s", r.g.name, i0.id])
    r.sched.enqueue(r.call("b0"))
    r.sched.enqueue(r.call("b1"))
    calls = [r.call(f"q{k}", born=10 + k) for k in range(5)] + [r.call("routed", session="s", born=1)]
    for c in calls:
        r.sched.enqueue(c)
    r.sched.unqueue(calls[1])
    assert r.g.queued == 5
    heads = [e[2].id for e in r.sched.first(r.g, 3)]
    assert heads == ["routed", "q0", "q2"]
    assert [e[2].id for e in heap_top(r.g.heap, 10)] == ["q0", "q2", "q3", "q4"]
    assert [c.id for c in r.sched.session_calls(r.g, "s")] == ["routed"]


def test_program_order_serves_the_least_served_program_first_within_its_bound() -> None:
    """``order``: a call queues as if its request started weight x its program's service later, at most
    ``bound`` later; priority still comes first, and without the decision service is ignored."""
    s = 1_000_000  # µs
    r = Rig(Echo)
    r.sched.enqueue(r.call("busy"))
    r.sched.enqueue(r.call("served-3s", born=10 * s, svc=3 * s))
    r.sched.enqueue(r.call("fresh", born=12 * s))
    for fid in ["busy", "served-3s"]:
        r.finish(r.calls[fid])
    assert r.order() == ["busy", "served-3s", "fresh"]  # no order decision: the older request first

    r = Rig(Echo)
    r.decide(["order", "*", 1.0, 5.0])
    r.sched.enqueue(r.call("busy"))
    r.sched.enqueue(r.call("served-3s", born=10 * s, svc=3 * s))  # as if born at 13 s
    r.sched.enqueue(r.call("fresh", born=12 * s))
    r.sched.enqueue(r.call("served-1h", born=1 * s, svc=3600 * s))  # bounded: as if born at 6 s
    r.sched.enqueue(r.call("urgent", born=20 * s, svc=60 * s, priority=1))
    r.sched.enqueue(r.call("fresh-later", born=13 * s + 1))
    for fid in ["busy", "urgent", "served-1h", "fresh", "served-3s"]:
        r.finish(r.calls[fid])
    assert r.order() == ["busy", "urgent", "served-1h", "fresh", "served-3s", "fresh-later"]

    r.decide(["order", "*", None, 0])  # ended: request age again
    assert r.table.ordering(r.g.name) is None
    r.finish(r.calls["fresh-later"])
    r.sched.enqueue(r.call("busy2"))
    r.sched.enqueue(r.call("served", born=10 * s, svc=3 * s))
    r.sched.enqueue(r.call("new", born=12 * s))
    r.finish(r.calls["busy2"])
    assert r.order()[-2:] == ["busy2", "served"]


def test_an_order_for_one_actor_wins_over_the_one_for_every_actor() -> None:
    r = Rig(Echo)
    r.decide(["order", "*", 1.0, 30.0], ["order", r.g.name, 10.0, 60.0])
    assert r.table.ordering(r.g.name) == (10.0, 60.0)
    assert r.table.ordering("Other") == (1.0, 30.0)
    assert r.table.summary()["order"] == {"*": {"weight": 1.0, "bound_s": 30.0},
                                          r.g.name: {"weight": 10.0, "bound_s": 60.0}}
