"""The local controller's enforcement side: how a node carries out the policy actor's decisions.

Every node applies each decision batch itself, event-driven, with no round trip: new priorities
reorder its queues; a ``migrate`` hands the session's queued calls to the destination's node (whose
node pulls the session's state through the state layer first); ``scale`` starts or drains instances
within the hints' bounds; weights and session routes are read when each call is bound. It also
answers the policy actor's metrics requests with a compact summary of its queues.

``Controller`` is a mixin of ``Node``: it works on the node's queues and instances.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import OrderedDict
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Any

from ..bus import envelope as env
from ..state import keys as state_keys
from .base import run_hook

if TYPE_CHECKING:
    from .node import ActorGroup, Call, Instance

_KEEP: set[asyncio.Task[None]] = set()  # on_stop tasks still running (the loop keeps only weak refs)
log = logging.getLogger("nalar.control")
#: Queued sessions each actor reports per metrics round (those first in line), for head-of-line
#: migration and the priority policies.
WAITING_REPORTED = 32
_FAILURES_KEPT = 10_000


class Controller:
    """Decision enforcement and metrics for a ``Node`` (mixin)."""

    if TYPE_CHECKING:
        from .runtime import Runtime
        from .sessions import Sessions

        rt: Runtime
        name: str
        boot: str
        groups: dict[str, ActorGroup]
        active: dict[str, Call]
        sessions: Sessions | None
        counters: dict[str, int]
        sched_ns: int
        sched_calls: int
        _wheel: Any

        def _enqueue(self, c: Call) -> None: ...
        def _push(self, c: Call, inst: Instance | None, key: tuple[int, int] | None = None) -> None: ...
        def _unqueue(self, c: Call) -> None: ...
        def _queued_calls(self, g: ActorGroup) -> list[Call]: ...
        def _pump(self, inst: Instance) -> None: ...
        def _pump_all(self, g: ActorGroup) -> None: ...
        def _new_instance(self, g: ActorGroup) -> Instance: ...
        def _fits(self, data: bytes, headers: dict[str, str]) -> bool: ...
        def _trace_finish(self, c: Call, ok: bool, value: Any) -> None: ...
        async def _serve(self, g: ActorGroup) -> None: ...
        async def _unserve(self, g: ActorGroup) -> None: ...

    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}  # every live instance on this node, by id
        self._failures: OrderedDict[str, int] = OrderedDict()  # session -> failed calls (re-entering jobs)
        self.control = {"batches": 0, "migrated": 0, "provisioned": 0, "killed": 0, "metrics_sent": 0}
        self.control_errors: dict[str, str] = {}

    # -- routing a call that arrived here -------------------------------------------------------
    def _elsewhere(self, g: ActorGroup, c: Call, direct: bool) -> str | None:
        """The node this call belongs on, if the decisions in force say it is not this one."""
        t = self.rt.table
        if c.session is not None:
            iid, hard = t.instance_for(g.name, c.session)
            if iid is not None:
                node = t.instances.get(iid)
                if node is not None and node != self.name and (hard or not direct) and self.rt.alive(node):
                    return node
                return None
        if not direct:  # from the queue group: does the policy still send this actor's work here?
            w = t.weights.get(g.name)
            if w and not any(w.get(i.id, 0.0) > 0 for i in g.instances if not i.draining):
                node = t.node_for(g.name, None)
                if node is not None and node != self.name and self.rt.alive(node):
                    return node
        return None

    def _readmit(self, c: Call) -> None:
        """A call parked while its session's state moved: follow the session's route, or run here."""
        dest = self._elsewhere(c.group, c, True) if self.rt.table.active else None
        if dest is not None and self._hand_over(c, dest):
            return
        assert self.sessions is not None
        self.sessions.admit(c)

    def _hand_over(self, c: Call, node: str | None) -> bool:
        """Send a call that has not started here to ``node`` (``None``: any node serving its actor).

        The caller is not involved: the new node answers its reply subject. False if it cannot go
        (it would no longer fit the server's payload limit with the forwarding header).
        """
        g = c.group
        h = {env.H_ID: c.id, env.H_DEADLINE: f"{c.deadline:.3f}", env.H_REQ: c.request, env.H_FWD: self.name}
        if c.session is not None:
            h[env.H_SESSION] = c.session
        if c.parent:
            h[env.H_PARENT] = c.parent
        if c.priority:
            h[env.H_PRIORITY] = str(c.priority)
        if c.attempt >= 0:
            h[env.H_ATTEMPT] = str(c.attempt)
        if c.stage:
            h[env.H_STAGE] = str(c.stage)
        if c.born:
            h[env.H_BORN] = str(c.born)
        if c.traceparent:
            h[env.H_TRACEPARENT] = c.traceparent
        try:
            data = env.encode_call(c.method, c.args, c.kwargs)
        except (TypeError, ValueError):
            return False
        if not self._fits(data, h):
            return False
        subject = self.rt.subjects.call(g.name) if node is None else self.rt.subjects.call_at(g.name, node)
        c.done = True  # this node is finished with it
        self.active.pop(c.id, None)
        if c.wk:
            self._wheel.discard(c.wk, c)
        if c.span is not None:
            c.span.set_attribute("nalar.handed_to", node or "*")
            self._trace_finish(c, True, {})
        self.rt.send(subject, data, h, c.reply)
        self.counters["forwarded"] += 1
        return True

    # -- applying decisions ----------------------------------------------------------------------
    def _on_decisions(self, ops: list[Any], reply: str) -> None:
        """A batch was applied to the table: carry out what it asks of this node, then say so."""
        prio: set[str] = set()
        weights: set[str] = set()
        scale: set[str] = set()
        migrations = []
        for op in ops:
            kind = op[0]
            if kind == "priority":
                prio.add(op[1])
            elif kind == "weights":
                weights.add(op[1])
            elif kind == "migrate":
                migrations.append(op)
            elif kind == "scale" and op[1] == self.name:
                scale.add(op[2])
        for actor in weights:
            g = self.groups.get(actor)
            if g is not None:
                self._set_weights(g)
        if prio:
            self._reprioritise(prio)
        for op in migrations:
            try:
                self._migrate(op)
            except Exception as e:  # one bad migration must not stop the batch
                log.exception("migration %s failed", op[1])
                self.control_errors[f"migrate {op[1]}"] = repr(e)
        for actor in scale:
            self._reconcile(actor)
        if ops:
            self.control["batches"] += 1
        if reply:
            self.rt.send(reply, env.dumps({"node": self.name, "v": self.rt.table.version}))

    def _set_weights(self, g: ActorGroup) -> None:
        w = self.rt.table.weights.get(g.name)
        for inst in g.instances:
            inst.weight = 1.0 if w is None else w.get(inst.id, 0.0)
        self._pump_all(g)

    def _reprioritise(self, sessions: set[str]) -> None:
        """Queued calls of these sessions take their new priority, keeping their arrival order.

        Their entries change in place and each queue they are in is heapified again (dropping dead
        entries), so no call changes queue or loses its place among calls of equal priority.
        """
        priority = self.rt.table.priority
        for g in self.groups.values():
            for heap in (g.heap, *(inst.heap for inst in g.instances)):
                hit = False
                for e in heap:
                    c = e[2]
                    if c is not None and c.session in sessions:
                        e[0] = -priority(c.session, g.name, c.priority)
                        hit = True
                if hit:
                    heap[:] = [e for e in heap if e[2] is not None]
                    heapify(heap)

    def _session_calls(self, g: ActorGroup, session: str) -> list[Call]:
        out = [c for c in self._queued_calls(g) if c.session == session]
        out.sort(key=lambda c: c.qe[1] if c.qe is not None else (0, 0))  # queue order
        return out

    def _migrate(self, op: list[Any]) -> None:
        """``migrate(session, src, dst)``: queued calls go to ``dst`` (its route is already set)."""
        mid, session, actor, src, dst = op[1:6]
        g = self.groups.get(actor)
        if g is None:
            return
        t = self.rt.table
        dst_node = t.instances.get(dst)
        src_node = t.instances.get(src)
        if dst_node is None:
            self.control_errors[f"migrate {mid}"] = f"destination instance {dst!r} is unknown"
            return
        unit = None
        if g.hints.stateful and self.sessions is not None:
            try:
                unit = state_keys.unit(session, actor)
            except ValueError:
                return
        if dst_node == self.name:  # bind its queued calls here to dst; fetch its state if it is elsewhere
            for c in self._session_calls(g, session):
                self._unqueue(c)
                self._enqueue(c)
            if unit is not None and src_node is not None and src_node != self.name:
                asyncio.get_running_loop().create_task(self._prefetch(unit, src_node))
            return
        calls: list[Call] = []
        if unit is not None:
            assert self.sessions is not None
            calls = self.sessions.withdraw(unit)
        seen = {id(c) for c in calls}
        calls.extend(c for c in self._session_calls(g, session) if id(c) not in seen)
        moved = 0
        for c in calls:
            self._unqueue(c)
            if self._hand_over(c, dst_node):
                moved += 1
            elif unit is not None:
                assert self.sessions is not None
                self.sessions.admit(c)
            else:
                self._enqueue(c)
        self.control["migrated"] += moved

    async def _prefetch(self, unit: bytes, src: str) -> None:
        """Pull a migrating session's state before its calls arrive (they wait for it if not)."""
        assert self.sessions is not None
        try:
            await self.sessions.bring_here(unit, expect_src=src)
        except Exception as e:  # not placed there (a new session), or already moved: its calls decide
            log.debug("prefetch of %s from %s: %r", state_keys.split_unit(unit), src, e)

    # -- provision and kill ----------------------------------------------------------------------
    def _reconcile(self, actor: str) -> None:
        """Start or drain instances of ``actor`` until this node has the count the policy wants.

        Instances still starting count as there; if fewer are wanted than run once they are up, the
        excess (those the policy named first) drains then (``_provision`` reconciles again).
        """
        want = self.rt.table.scale.get(self.name, {}).get(actor)
        if want is None:
            return
        g = self.groups.get(actor)
        if g is None:
            self.control_errors[f"scale {actor}"] = f"node {self.name} does not host {actor!r}"
            return
        count, drain = want
        cap = g.hints.max_instances
        if cap is not None and count > cap:
            self.control_errors[f"scale {actor}"] = f"asked for {count}, max_instances is {cap}"
            count = cap
        live = [i for i in g.instances if not i.draining]
        have = len(live) + g.provisioning
        if count > have:
            for _ in range(count - have):
                g.provisioning += 1
                asyncio.get_running_loop().create_task(self._provision(g))
        elif count < len(live):
            order = sorted(live, key=lambda i: (i.id not in drain, i.running + i.queued, -live.index(i)))
            for inst in order[:len(live) - count]:
                self._kill(inst)

    async def _provision(self, g: ActorGroup) -> None:
        from .node import _Host

        try:
            inst = self._new_instance(g)
            await run_hook(inst.obj.on_start)
            if g.has_sync:
                inst.host = _Host.start(self, inst)  # type: ignore[arg-type]
        except Exception as e:
            log.exception("provisioning an instance of %s failed", g.name)
            self.control_errors[f"provision {g.name}"] = repr(e)
            return
        finally:
            g.provisioning -= 1
        w = self.rt.table.weights.get(g.name)
        if w is not None:
            inst.weight = w.get(inst.id, 0.0)
        g.instances.append(inst)
        self._instances[inst.id] = inst
        self.control["provisioned"] += 1
        await self._serve(g)
        self._pump(inst)
        self._reconcile(g.name)  # fewer may be wanted by now (a kill decided while it was starting)

    def _kill(self, inst: Instance) -> None:
        """Stop giving ``inst`` calls; its queued calls go to the others; it stops when idle."""
        g = inst.group
        inst.draining = True
        for _, key, c in list(inst.heap):
            if c is not None:
                self._unqueue(c)
                self._push(c, None, key)
        inst.heap.clear()
        if inst.running == 0:
            self._retire(inst)
        if any(not i.draining for i in g.instances):
            self._pump_all(g)
        else:  # none left here: stop taking its calls, pass the queued ones to other nodes
            asyncio.get_running_loop().create_task(self._hand_off_group(g))

    async def _hand_off_group(self, g: ActorGroup) -> None:
        await self._unserve(g)
        for c in sorted((e[2] for e in g.heap if e[2] is not None), key=lambda c: c.qe[1] if c.qe else (0, 0)):
            if any(not i.draining for i in g.instances):
                break  # provisioned again meanwhile
            self._unqueue(c)
            if not self._hand_over(c, None):
                self._push(c, None)

    def _retire(self, inst: Instance) -> None:
        g = inst.group
        if inst in g.instances:
            g.instances.remove(inst)
        self._instances.pop(inst.id, None)
        self.control["killed"] += 1
        if inst.host is not None and not inspect.iscoroutinefunction(inst.obj.on_stop):
            inst.host.stop(block=False)
        else:
            if inst.host is not None:
                inst.host.stop(block=False)  # its on_stop is async: run below, on the loop

            async def stop() -> None:
                try:
                    await run_hook(inst.obj.on_stop)
                except Exception:
                    log.exception("%s.on_stop failed", inst.id)
            task = asyncio.get_running_loop().create_task(stop())
            _KEEP.add(task)
            task.add_done_callback(_KEEP.discard)

    # -- metrics -----------------------------------------------------------------------------------
    def _note_failure(self, session: str) -> None:
        f = self._failures
        f[session] = f.get(session, 0) + 1
        f.move_to_end(session)
        if len(f) > _FAILURES_KEPT:
            f.popitem(last=False)

    def _on_metrics(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if not reply:
            return
        self.control["metrics_sent"] += 1
        self.rt.send(reply, env.dumps(self.metrics()))

    def metrics(self) -> dict[str, Any]:
        """The compact summary the policy actor decides from (and ``nalar status`` shows)."""
        now = time.monotonic()
        actors = {}
        for g in self.groups.values():
            waiting = []
            tops = _heap_top(g.heap, WAITING_REPORTED)
            for inst in g.instances:
                tops.extend(_heap_top(inst.heap, WAITING_REPORTED))
            tops.sort()
            for e in tops[:WAITING_REPORTED]:
                c = e[2]
                if c.session is not None:
                    waiting.append([c.session, c.pin.id if c.pin is not None else None,
                                    round((now - c.t0) * 1000, 1), c.stage, self._failures.get(c.session, 0)
                                    + (c.attempt > 0), -e[0]])
            a: dict[str, Any] = {
                "kind": getattr(g.cls, "kind", "actor"), "stateful": g.hints.stateful,
                "min": g.hints.min_instances, "max": g.hints.max_instances,
                "queued": g.queued, "running": sum(i.running for i in g.instances),
                "done": g.done, "failed": g.failed, "lat_ms": round(g.lat_ms, 2), "wait_ms": round(g.wait_ms, 2),
                "provisioning": g.provisioning,
                "instances": [[i.id, i.running, i.queued, i.limit, i.draining] for i in g.instances],
                "waiting": waiting,
            }
            if g.fresh:
                a["recent"] = g.fresh
                g.fresh = []
            stats = engine_stats(g)
            if stats is not None:
                a["engine"] = stats
            actors[g.name] = a
        return {"node": self.name, "boot": self.boot, "v": self.rt.table.version, "t": time.time(),
                "in_flight": len(self.active), "sched": [self.sched_ns, self.sched_calls], "actors": actors}

    def control_status(self) -> dict[str, Any]:
        return dict(self.control, applied_version=self.rt.table.version,
                    schedule_us=round(self.sched_ns / self.sched_calls / 1000, 3) if self.sched_calls else None,
                    errors=dict(self.control_errors))


def _heap_top(heap: list[list[Any]], k: int) -> list[list[Any]]:
    """The ``k`` first live entries of a heap, in O(k log k) (not O(len(heap)))."""
    out: list[list[Any]] = []
    if not heap:
        return out
    cand: list[tuple[list[Any], int]] = [(heap[0], 0)]
    n = len(heap)
    while cand and len(out) < k:
        e, i = heappop(cand)
        if e[2] is not None:
            out.append(e)
        for j in (2 * i + 1, 2 * i + 2):
            if j < n:
                heappush(cand, (heap[j], j))
    return out


def engine_stats(g: ActorGroup) -> dict[str, Any] | None:
    """Model engine stats (running, waiting, KV use) from instances that offer ``engine_stats()``."""
    out: dict[str, Any] = {}
    for inst in g.instances:
        fn = getattr(inst.obj, "engine_stats", None)
        if callable(fn):
            try:
                out[inst.id] = fn()
            except Exception as e:
                out[inst.id] = {"error": repr(e)}
    return out or None
