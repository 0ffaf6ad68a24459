"""The scheduler: per-instance priority queues and late binding, with no knowledge of how calls run.

A call is bound to an instance only when one has room: a session routed to an instance of this node
waits in that instance's own queue, other calls in the actor's queue, which every instance takes from.
Both are ordered by priority, then by when the call's request started, then arrival. A bound call goes
to the ``start`` callback it was given (the executor); nothing here touches the bus, so the scheduler
is tested in-process (tests/test_scheduler.py).
"""
from __future__ import annotations

import logging
import time
from heapq import heapify, heappop, heappush
from typing import Any, Callable, cast

from ..base import Budgeted
from ..control import DecisionTable
from .calls import ActorGroup, Book, Bound, Call, Instance, Start

log = logging.getLogger("nalar.node")


class Scheduler:
    """Queues calls by priority and binds each to an instance with room (``start``) when one has it."""

    def __init__(self, book: Book, table: DecisionTable, start: Start,
                 joins: Callable[[Instance, Call], bool] | None = None,
                 preempt: Callable[[Call], bool] | None = None) -> None:
        self.book = book
        self.table = table
        self.start = start
        #: Preempt a running call for one that must wait (``preemptable`` actors): the executor's.
        self.preempt = preempt
        #: Whether a call would join a batch forming at an instance (which then needs no slot of its own).
        self.joins = joins
        self._seq = 0

    # -- in ---------------------------------------------------------------------------------------
    def enqueue(self, c: Call, bound: Bound | None = None) -> None:
        """Bind ``c`` now if an instance has room and no call waits before it, else queue it.

        ``bound`` is the routing lookup the caller already made for ``c`` (``None``: look it up): a
        route, cache affinity or home makes the call wait for that instance (soft ones only while it
        is here and serving; the policy moves sessions that wait too long).
        """
        g = c.group
        is_async = g.methods[c.method]
        table = self.table
        inst: Instance | None = None
        if table.active and (c.meta.session is not None or g.name in table.sticky):
            iid = (bound if bound is not None else table.instance_for(g.name, c.meta.session))[0]
            if iid is not None:
                inst = self.book.instances.get(iid)
                if inst is not None and (inst.draining or inst.group is not g):
                    inst = None
        if inst is not None:
            if inst.queued == 0 and self.admits(inst, c, is_async):
                self.start(inst, c)
            else:
                self.push(c, inst)
                if g.hints.preemptable and self.preempt is not None:
                    self.preempt(c)
            return
        free = self.pick(g, c, is_async) if not g.shared else None
        if free is None:
            self.push(c, None)
            if g.hints.preemptable and self.preempt is not None:
                self.preempt(c)  # a call below it gives its slot up; the pump then brings this one
        else:
            self.start(free, c)

    def requeue(self, c: Call) -> None:
        """A preempted call back in its queue (its route's instance's, or its actor's), not bound now:
        the slot it left goes to the call it was preempted for."""
        g = c.group
        inst: Instance | None = None
        if self.table.active and c.meta.session is not None:
            iid = self.table.instance_for(g.name, c.meta.session)[0]
            inst = self.book.instances.get(iid) if iid is not None else None
            if inst is not None and (inst.draining or inst.group is not g):
                inst = None
        self.push(c, inst)

    def push(self, c: Call, inst: Instance | None, key: tuple[int, int] | None = None) -> None:
        """Queue ``c`` by its priority, then ``key`` (a call queued again keeps its own).

        The key is when its request started, then its arrival here: among equals, an older request's
        call goes first, so a request's later stages do not queue again behind newer requests' first
        ones (FCFS by request, not by call). Under an ``order`` decision the request's start moves later
        by its program's service so far, weighted and bounded (``control.ops.Order``): the least-served
        program first. Under ``sticky`` (the baseline's binding) it is arrival alone: plain FIFO.
        """
        g = c.group
        if key is None:
            self._seq += 1
            table = self.table
            if g.name in table.sticky:
                born = 0
            else:
                born = c.meta.born or int(time.time() * 1_000_000)
                o = table.ordering(g.name) if table.order else None
                if o is not None and c.meta.svc:  # program-level: as if its request started that much later
                    born += int(min(o[0] * c.meta.svc, o[1] * 1_000_000))
            key = (born, self._seq)
        e = [-self.table.priority(c.meta.session, g.name, c.meta.priority), key, c]
        c.entry = e
        c.pinned = inst
        g.queued += 1
        if inst is None:
            g.shared += 1
            heappush(g.heap, e)
        else:
            inst.queued += 1
            heappush(inst.heap, e)

    def unqueue(self, c: Call) -> None:
        """Take a queued call out of its queue (its heap entry dies in place and is skipped later)."""
        e = c.entry
        if e is None:
            return
        e[2] = None
        c.entry = None
        g = c.group
        g.queued -= 1
        if c.pinned is None:
            g.shared -= 1
        else:
            c.pinned.queued -= 1
            c.pinned = None

    def requeue_shared(self, inst: Instance) -> None:
        """``inst`` drains: the calls routed to it go back to its actor's queue, keeping their place."""
        for _, key, c in list(inst.heap):
            if c is not None:
                self.unqueue(c)
                self.push(c, None, key)
        inst.heap.clear()

    # -- reading the queues -------------------------------------------------------------------------
    def queued_calls(self, g: ActorGroup) -> list[Call]:
        out = [e[2] for e in g.heap if e[2] is not None]
        for inst in g.instances:
            out.extend(e[2] for e in inst.heap if e[2] is not None)
        return out

    def session_calls(self, g: ActorGroup, session: str) -> list[Call]:
        """The session's queued calls at ``g``, in queue order."""
        out = [c for c in self.queued_calls(g) if c.meta.session == session]
        out.sort(key=_place)
        return out

    def shared_calls(self, g: ActorGroup) -> list[Call]:
        """The calls in the actor's own queue, in queue order."""
        return sorted((e[2] for e in g.heap if e[2] is not None), key=_place)

    def first(self, g: ActorGroup, k: int) -> list[list[Any]]:
        """The ``k`` first entries over the actor's queue and its instances' (``[-prio, key, call]``)."""
        tops = heap_top(g.heap, k)
        for inst in g.instances:
            tops.extend(heap_top(inst.heap, k))
        tops.sort(key=lambda e: (e[0], e[1]))
        return tops[:k]

    # -- binding ------------------------------------------------------------------------------------
    def admits(self, inst: Instance, c: Call, is_async: bool) -> bool:
        """Whether ``inst`` can start ``c`` now: a free slot, and for a budgeted actor (a model), room
        in its budget. A call is always let in alone, so no call is too big to ever run. Under
        ``sticky`` (the baseline) there is no budget: calls are bound on arrival and the engine's own
        first-come queue takes them, as frameworks without a scheduler do."""
        if not inst.has_room(is_async):
            return self.joins is not None and c.method in inst.group.batched and self.joins(inst, c)
        g = inst.group
        if not g.budgeted or g.name in self.table.sticky:
            return True
        if c.cost < 0:
            c.cost = cost_of(inst, c)
        if inst.spent == 0:
            return True
        try:
            budget = cast(Budgeted, inst.obj).admission_budget()
        except Exception:
            log.exception("%s.admission_budget failed: no budget", g.name)
            budget = None
        return budget is None or inst.spent + c.cost <= budget

    def pick(self, g: ActorGroup, c: Call, is_async: bool) -> Instance | None:
        """The instance with room and the least work for its weight (late binding: only now)."""
        best, best_load, fallback = None, 0.0, None
        for inst in g.instances:
            if self.admits(inst, c, is_async):
                w = inst.weight
                if w <= 0:  # the policy steers work away from it: only if nothing else has room
                    fallback = fallback or inst
                    continue
                if inst.running == 0 and w >= 1.0:
                    return inst
                load = inst.running / w
                if best is None or load < best_load:
                    best, best_load = inst, load
        return best or fallback

    def pump(self, inst: Instance) -> None:
        """``inst`` has room: give it the best call from its own queue or the actor's, while it has room."""
        t0 = time.perf_counter_ns()
        g = inst.group
        own, shared, methods = inst.heap, g.heap, g.methods
        n = 0
        while True:
            while own and own[0][2] is None:
                heappop(own)
            while shared and shared[0][2] is None:
                heappop(shared)
            if not own and not shared:
                break
            if own and (not shared or own[0][:2] < shared[0][:2]):
                first, second = own, shared
            else:
                first, second = shared, own
            heap = first
            if not self.admits(inst, first[0][2], methods[first[0][2].method]):
                if not second or not self.admits(inst, second[0][2], methods[second[0][2].method]):
                    break
                heap = second
            c = heappop(heap)[2]
            self.unqueue(c)
            self.start(inst, c)
            n += 1
        if n:
            self.book.sched_ns += time.perf_counter_ns() - t0

    def pump_all(self, g: ActorGroup) -> None:
        for inst in g.instances:
            if not inst.draining and (inst.queued or g.shared):
                self.pump(inst)

    # -- decisions that reorder -----------------------------------------------------------------
    def reprioritise(self, sessions: set[str]) -> None:
        """Queued calls of these sessions take their new priority, keeping their arrival order.

        Their entries change in place and each queue they are in is heapified again (dropping dead
        entries), so no call changes queue or loses its place among calls of equal priority.
        """
        priority = self.table.priority
        for g in self.book.groups.values():
            for heap in (g.heap, *(inst.heap for inst in g.instances)):
                hit = False
                for e in heap:
                    c = e[2]
                    if c is not None and c.meta.session in sessions:
                        e[0] = -priority(c.meta.session, g.name, c.meta.priority)
                        hit = True
                if hit:
                    heap[:] = [e for e in heap if e[2] is not None]
                    heapify(heap)

    def set_weights(self, g: ActorGroup) -> None:
        w = self.table.weights.get(g.name)
        for inst in g.instances:
            inst.weight = 1.0 if w is None else w.get(inst.id, 0.0)
        self.pump_all(g)


def _place(c: Call) -> tuple[int, int]:
    return c.entry[1] if c.entry is not None else (0, 0)


def cost_of(inst: Instance, c: Call) -> int:
    """What ``c`` holds of a budgeted instance while it runs (its own ``admission_cost``)."""
    try:
        return max(0, int(cast(Budgeted, inst.obj).admission_cost(c.method, c.args, c.kwargs)))
    except Exception:  # bad arguments fail in the method itself, with their own error
        return 0


def heap_top(heap: list[list[Any]], k: int) -> list[list[Any]]:
    """The ``k`` first live entries of a heap, in O(k log k) (not O(len(heap)))."""
    out: list[list[Any]] = []
    if not heap:
        return out
    cand: list[tuple[tuple[int, tuple[int, int]], int]] = [((heap[0][0], heap[0][1]), 0)]
    n = len(heap)
    while cand and len(out) < k:
        _, i = heappop(cand)
        e = heap[i]
        if e[2] is not None:
            out.append(e)
        for j in (2 * i + 1, 2 * i + 2):
            if j < n:
                heappush(cand, ((heap[j][0], heap[j][1]), j))
    return out
