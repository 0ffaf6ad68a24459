"""The node runtime: a process that hosts actor instances and serves their calls from the bus.

A node subscribes to ``call.<actor>`` in queue group ``<actor>`` for each actor it hosts, so any
number of nodes share one actor type's load, and to ``call.<actor>.<node>`` for calls routed to it.
Inside the node, the local controller (this file and ``controller.py``) keeps calls in priority
queues: one per actor for calls any instance may take, one per instance for calls routed to it. A
call is bound to an instance only when one has room (late binding): a sync instance (a pykka actor,
its own thread) runs one call at a time; an instance with ``async def`` methods runs up to
``max_concurrency`` calls on the node's event loop.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import re
import secrets
import socket
import time
import traceback
from collections import OrderedDict, deque
from functools import partial
from heapq import heappop, heappush
from typing import Any

import logging

import pykka

from ..bus import envelope as env
from ..bus import tracing
from ..bus.errors import MalformedMessage, RemoteError, StateError
from ..bus.subjects import check_token
from ..state import keys as state_keys
from ..state.managed import Txn, current_txn
from .base import Actor, actor_name, public_methods, run_hook
from .context import current_call
from .controller import Controller, engine_stats
from .deadlines import DeadlineWheel
from .future import Future
from .hints import Hints, hints_of
from .retry import ACK_AFTER, HEARTBEAT_INTERVAL
from .runtime import Runtime
from .sessions import Sessions

DEFAULT_MAX_QUEUE = 100_000
_LATER = object()  # a control op that answers later, from a task
#: Times a call whose commit lost a race on its session's objects is re-run before it fails.
MAX_CONFLICT_RETRIES = 8
log = logging.getLogger("nalar.node")


class Call(env.CallMessage):
    """A call accepted by this node: the wire fields plus where and how it runs."""

    __slots__ = ("group", "inst", "task", "children", "span", "qspan", "otel_ctx", "done", "wk",
                 "unit", "txn", "committing", "conflicts", "also", "qe", "pin", "t0", "cost")

    group: "ActorGroup"

    def __init__(self) -> None:
        self.inst: Instance | None = None
        self.task: asyncio.Task[None] | None = None
        self.children: list[Future[Any]] | None = None
        self.span: Any = None
        self.qspan: Any = None
        self.otel_ctx: Any = None
        self.done = False
        self.wk = 0
        self.unit: bytes = b""  # (session, actor) for stateful calls with a session
        self.txn: Txn | None = None
        self.committing = False
        self.conflicts = 0
        self.also: list[str] | None = None  # reply subjects of retries that found it running
        self.qe: list[Any] | None = None  # its live entry in a queue: [-priority, (born, seq), call]
        self.pin: Instance | None = None  # the instance whose own queue holds it
        self.t0 = 0.0  # when it arrived (monotonic): queue waits and latencies
        self.cost = -1  # its admission cost at a budgeted instance (-1: not counted)


class Instance:
    __slots__ = ("id", "group", "obj", "host", "running", "sync_running", "limit", "handled", "heap",
                 "queued", "weight", "draining", "spent")

    def __init__(self, id: str, group: "ActorGroup", obj: Actor, limit: int | None) -> None:
        self.id = id
        self.group = group
        self.obj = obj
        self.host: pykka.ActorRef[Any] | None = None
        self.running = 0
        self.sync_running = 0  # a def method holds the instance's one thread
        self.limit = limit
        self.handled = 0
        self.heap: list[list[Any]] = []  # calls routed to this instance
        self.queued = 0
        self.weight = 1.0  # its share of the actor's unrouted calls (policy ``route(actor, ...)``)
        self.draining = False  # killed: takes no more calls, stops when its running ones end
        self.spent = 0  # admission cost held by its running calls (budgeted actors: a model's KV)

    def has_room(self, is_async: bool) -> bool:
        if self.draining or (self.limit is not None and self.running >= self.limit):
            return False
        return is_async or self.sync_running == 0


class ActorGroup:
    """All instances of one actor type on this node, and the calls waiting for one of them."""

    def __init__(self, cls: type, hints: Hints) -> None:
        self.name = actor_name(cls)
        self.cls = cls
        self.hints = hints
        self.methods = public_methods(cls)
        self.has_async = any(self.methods.values())
        self.has_sync = not all(self.methods.values())
        self.instances: list[Instance] = []
        self.heap: list[list[Any]] = []  # calls any instance may take: [-priority, (born, seq), call]
        self.queued = 0  # live calls queued here, in ``heap`` and in the instances' own queues
        self.shared = 0  # of which in ``heap``
        self.done = 0
        self.failed = 0
        self.next_index = 0
        self.provisioning = 0
        self.lat_ms = 0.0  # moving averages: run time, and queue wait
        self.wait_ms = 0.0
        self.kind_model = getattr(cls, "kind", "") == "model"
        # An instance that prices its calls (``admission_cost``) and says what it can hold at once
        # (``admission_budget``): a model whose engine keeps room for its sessions' prefix caches.
        self.budgeted = callable(getattr(cls, "admission_cost", None)) and callable(
            getattr(cls, "admission_budget", None))
        self.recent: OrderedDict[str, str] = OrderedDict()  # session -> instance that last served it
        self.fresh: list[tuple[str, str]] = []  # (session, instance) pairs new since the last metrics


class _Host(pykka.ThreadingActor):
    """The pykka actor behind a sync instance: its mailbox serialises the instance's calls.

    Its thread is a daemon so that a method stuck forever cannot keep a stopping node alive.
    """

    use_daemon_thread = True

    def __init__(self, node: "Node", inst: Instance) -> None:
        super().__init__()
        self._node = node
        self._inst = inst

    def on_stop(self) -> None:
        if inspect.iscoroutinefunction(self._inst.obj.on_stop):
            return  # the node runs an async on_stop on its loop
        try:
            self._inst.obj.on_stop()
        except Exception:
            log.exception("%s.on_stop failed", self._inst.id)

    def on_receive(self, message: Any) -> Any:
        self._node._run_sync(self._inst, message)


def default_node_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _safe(fn: Any, fallback: str) -> str:
    try:
        return str(fn())
    except BaseException:  # an exception whose __str__ raises must not take the node down
        return fallback


def error_dict(e: BaseException, actor: str, method: str, fid: str) -> dict[str, Any]:
    """The wire form of an exception raised by user code (with its traceback and nested chain)."""
    tb = _safe(lambda: "".join(traceback.format_exception(e)), f"{type(e).__qualname__} (traceback unavailable)")
    if isinstance(e, RemoteError):
        return {"kind": "error", "type": e.type, "message": e.message, "actor": actor, "method": method,
                "traceback": tb, "chain": [e.to_dict()] + list(e.chain), "future_id": fid}
    return {"kind": "error", "type": type(e).__qualname__, "message": _safe(lambda: e, f"<unprintable {type(e).__qualname__}>"),
            "actor": actor, "method": method, "traceback": tb, "chain": [], "future_id": fid}


def _err(kind: str, type_: str, message: str, c: Call) -> dict[str, Any]:
    actor = c.group.name if getattr(c, "group", None) is not None else ""
    return {"kind": kind, "type": type_, "message": message, "actor": actor,
            "method": getattr(c, "method", ""), "traceback": "", "chain": [], "future_id": c.id}


class Node(Controller):
    """Hosts instances of the given actor classes and serves them over the runtime's bus."""

    def __init__(self, runtime: Runtime, actors: list[tuple[type, int | None]], name: str | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, state_dir: str | None = None) -> None:
        self.rt = runtime
        self.name = check_token(name or default_node_name(), "node name")
        runtime.table.here = self.name  # sticky round-robin binds among this node's own instances
        self.max_queue = max_queue
        self.state_dir = state_dir
        self.sessions: Sessions | None = None
        self.boot = secrets.token_hex(6)  # this incarnation: a restart under the same name is another node
        self.groups: dict[str, ActorGroup] = {}
        self.active: dict[str, Call] = {}
        self._subs: list[Any] = []
        self._call_subs: list[Any] = []
        self._group_subs: dict[str, list[Any]] = {}
        self._idle = asyncio.Event()
        self._wheel = DeadlineWheel(self._expire)
        # (arrival, id) of calls whose callers may retry; ids, not calls, so answered calls die at once
        self._acks: deque[tuple[float, str]] = deque()
        self._ticker: asyncio.Task[None] | None = None
        self.started = time.time()
        self.counters = {"received": 0, "done": 0, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0,
                         "forwarded": 0}
        self._seq = 0
        self.sched_ns = 0  # time the local controller spent placing calls (admission to bind or queue)
        self.sched_calls = 0
        Controller.__init__(self)
        for cls, count in actors:
            self._add_group(cls, count)

    def _add_group(self, cls: type, count: int | None) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not an actor class (subclass nalar.Agent, nalar.Tool or nalar.Model)")
        h = hints_of(cls)
        n = max(h.min_instances, 1) if count is None else count
        if h.max_instances is not None and n > h.max_instances:
            raise ValueError(f"{cls.__name__}: {n} instances asked for, but its max_instances hint is "
                             f"{h.max_instances}")
        g = ActorGroup(cls, h)
        if g.name in self.groups:
            raise ValueError(f"actor {g.name!r} is listed twice")
        if not g.methods:
            raise ValueError(f"{cls.__name__} has no public methods to serve")
        for _ in range(n):
            g.instances.append(self._new_instance(g))
        self.groups[g.name] = g
        for inst in g.instances:
            self._instances[inst.id] = inst

    def _new_instance(self, g: ActorGroup) -> Instance:
        i = g.next_index
        g.next_index += 1
        iid = f"{g.name}-{self.name}-{i}"
        obj = g.cls()
        obj._nalar_instance = iid  # lets an instance name itself (a model's completions say who served them)
        return Instance(iid, g, obj, g.hints.concurrency_for(g.has_async))

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Run every instance's ``on_start`` (a failure fails the start), then subscribe."""
        rt = self.rt
        loop = asyncio.get_running_loop()
        if any(g.hints.stateful for g in self.groups.values()):
            import os as _os

            from ..bus.discovery import home

            path = self.state_dir or str(home() / "state" / self.name)
            if self.name == default_node_name():
                log.warning("node %s hosts stateful actors under a name that changes on restart; give it a "
                            "stable --name so it finds its sessions again", self.name)
            self.sessions = await Sessions.open(self, _os.path.abspath(path))
        for g in self.groups.values():
            for inst in g.instances:
                try:
                    await run_hook(inst.obj.on_start)
                except Exception as e:
                    raise RuntimeError(f"{inst.id}: on_start failed: {e!r}") from e
                if g.has_sync:
                    inst.host = _Host.start(self, inst)
        sub = rt.transport.subscribe
        for g in self.groups.values():
            if g.instances:
                await self._serve(g)
        self._subs.append(await sub(rt.subjects.cancel, self._on_cancel))
        self._subs.append(await sub(rt.subjects.status, self._on_status))
        self._subs.append(await sub(rt.subjects.node(self.name), self._on_control))
        self._subs.append(await sub(rt.subjects.metrics, self._on_metrics))
        rt.on_decisions = self._on_decisions
        if rt.table.version:  # decisions loaded before we were listening for them
            self._on_decisions(rt.table.snapshot_ops(), "")
        await rt.transport.flush()
        self._ticker = loop.create_task(self._tick())

    async def _serve(self, g: ActorGroup) -> None:
        """Take ``g``'s calls: as one of its queue group, and those routed to this node."""
        if g.name in self._group_subs:
            return
        rt = self.rt
        subs = [await rt.transport.subscribe(rt.subjects.call(g.name), partial(self._on_call, g, False), queue=g.name),
                await rt.transport.subscribe(rt.subjects.call_at(g.name, self.name), partial(self._on_call, g, True))]
        self._group_subs[g.name] = subs
        self._call_subs.extend(subs)

    async def _unserve(self, g: ActorGroup) -> None:
        for s in self._group_subs.pop(g.name, []):
            if s in self._call_subs:
                self._call_subs.remove(s)
            try:
                await s.unsubscribe()
            except Exception:
                pass

    async def _tick(self) -> None:
        """Heartbeat every second; acknowledge calls held for a second to callers that may retry."""
        hb_subject = self.rt.subjects.heartbeat(self.name)
        hb = env.dumps({"node": self.name, "boot": self.boot})
        next_hb = 0.0
        while True:
            now = time.monotonic()
            if now >= next_hb:
                self.rt.send(hb_subject, hb)
                next_hb = now + HEARTBEAT_INTERVAL
            acks: dict[str, list[str]] = {}
            q = self._acks
            active = self.active
            while q and q[0][0] <= now - ACK_AFTER:
                c = active.get(q.popleft()[1])
                if c is not None:
                    prefix, _, token = c.reply.rpartition(".")
                    acks.setdefault(prefix, []).append(token)
            for prefix, tokens in acks.items():
                self.rt.send(prefix + ".ack", env.dumps({"node": self.name, "boot": self.boot, "ids": tokens}))
            await asyncio.sleep(HEARTBEAT_INTERVAL / 4)

    def subscriptions(self) -> list[str]:
        s = self.rt.subjects
        return ([s.call(g) for g in self.groups] + [s.call_at(g, self.name) for g in self.groups]
                + [s.cancel, s.status, s.node(self.name), s.metrics] + self.rt.subscriptions())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking calls, let running ones finish for up to ``grace`` seconds, then stop instances."""
        for s in self._call_subs:
            try:
                await s.unsubscribe()
            except Exception:
                pass
        self._call_subs.clear()
        if self.active:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                pass
        for c in list(self.active.values()):  # still running after the grace period: answer them
            self._abort(c, "cancelled", "Cancelled", f"node {self.name} is stopping")
        for g in self.groups.values():
            for q in self._queued_calls(g):
                self._abort(q, "cancelled", "Cancelled", f"node {self.name} is stopping")
        self._wheel.stop()
        stopping = []
        for g in self.groups.values():
            for inst in g.instances:
                if inst.host is not None:
                    stopping.append(inst.host.stop(block=False))
                if inst.host is None or inspect.iscoroutinefunction(inst.obj.on_stop):
                    try:
                        await run_hook(inst.obj.on_stop)
                    except Exception:
                        log.exception("%s.on_stop failed", inst.id)
        if stopping:  # all together, bounded: a method stuck forever leaves only a daemon thread behind
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, partial(pykka.get_all, stopping, timeout=grace))
            except pykka.Timeout:
                log.warning("some instances did not stop within %s s; leaving their threads behind", grace)
        if self._ticker is not None:
            self._ticker.cancel()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception:
                pass
        if self.sessions is not None:
            self.sessions.close()
        await self.rt.close()

    # -- serving calls ----------------------------------------------------------------------------
    def _on_call(self, g: ActorGroup, direct: bool, subject: str, reply: str, data: bytes,
                 headers: dict[str, str] | None) -> None:
        try:
            c = env.decode_call(data, headers, reply, Call)
        except MalformedMessage as e:
            self.rt.count_malformed("call")
            if reply:
                self.rt.send(reply, env.encode_error({"kind": "bad_request", "type": "MalformedMessage",
                                                      "message": str(e), "actor": g.name}))
            return
        t0 = time.perf_counter_ns()  # scheduling starts with a decoded call (decoding is the bus's work)
        c.group = g
        self.counters["received"] += 1
        if c.method not in g.methods:
            self._reject(c, "unknown_method", "UnknownMethod",
                         f"actor {g.name!r} has no method {c.method!r}; it has {sorted(g.methods)}")
            return
        running = self.active.get(c.id)
        if running is not None:  # a retry of a call still running here: it gets the same answer
            if c.reply and c.reply != running.reply:
                running.also = (running.also or []) + [c.reply]
            if c.reply and c.attempt >= 0:  # and hears at once that it is held, by a live node
                prefix, _, token = c.reply.rpartition(".")
                self.rt.send(prefix + ".ack", env.dumps({"node": self.name, "boot": self.boot, "ids": [token]}))
            return
        if self.rt.table.active and c.fwd is None:  # routed elsewhere (a caller with older decisions)?
            dest = self._elsewhere(g, c, direct)
            if dest is not None and headers is not None:
                hdrs = dict(headers)
                hdrs[env.H_FWD] = self.name
                if self._fits(data, hdrs):
                    self.counters["forwarded"] += 1
                    self.rt.send(self.rt.subjects.call_at(g.name, dest), data, hdrs, reply)
                    return
        now = time.time()
        if not c.deadline:  # nothing waits forever: a call without a deadline gets the default
            c.deadline = now + self.rt.default_timeout
        elif c.deadline <= now:
            self._reject(c, "deadline", "DeadlineExceeded", "the call's deadline passed before it arrived")
            return
        if g.queued >= self.max_queue:
            self._reject(c, "overloaded", "Overloaded",
                         f"actor {g.name!r} on node {self.name} has {g.queued} calls queued (max {self.max_queue}); "
                         "add instances or nodes, or slow the callers down")
            return
        if tracing.TRACER is not None:
            self._trace_receive(c)
        c.t0 = time.monotonic()
        self.active[c.id] = c
        c.wk = self._wheel.add(c.deadline, c)
        if c.attempt >= 0 and c.reply:
            self._acks.append((c.t0, c.id))
        if c.session and g.hints.stateful and self.sessions is not None:
            try:
                c.unit = state_keys.unit(c.session, g.name)
            except ValueError as e:
                self._fail_call(c, "bad_request", "BadRequest", str(e))
                return
            self.sessions.admit(c)  # runs it when its state is here and its turn comes
        else:
            self._enqueue(c)
        self.sched_ns += time.perf_counter_ns() - t0
        self.sched_calls += 1

    def _fits(self, data: bytes, headers: dict[str, str]) -> bool:
        limit = self.rt.transport.max_payload
        return not limit or len(data) + env.header_size(headers) + env.HEADER_ALLOWANCE <= limit

    def _enqueue(self, c: Call) -> None:
        """Bind to an instance now if one has room (and no call waits before it), else queue it.

        A session routed to an instance of this node waits in that instance's own queue; others wait
        in the actor's queue, which every instance takes from. Both are ordered by priority, then
        arrival.
        """
        g = c.group
        is_async = g.methods[c.method]
        table = self.rt.table
        inst: Instance | None = None
        if table.active and (c.session is not None or g.name in table.sticky):
            # A route, cache affinity or home: the call waits for that instance (soft ones only while
            # it is here and serving; the policy moves sessions that wait too long).
            iid, _ = table.instance_for(g.name, c.session)
            if iid is not None:
                inst = self._instances.get(iid)
                if inst is not None and (inst.draining or inst.group is not g):
                    inst = None
        if inst is not None:
            if inst.queued == 0 and self._admits(inst, c, is_async):
                self._dispatch(inst, c)
            else:
                self._push(c, inst)
            return
        free = self._pick(g, c, is_async) if not g.shared else None
        if free is None:
            self._push(c, None)
        else:
            self._dispatch(free, c)

    def _push(self, c: Call, inst: Instance | None, key: tuple[int, int] | None = None) -> None:
        """Queue ``c`` by its priority, then ``key`` (a call queued again keeps its own).

        The key is when its request started, then its arrival here: among equals, an older request's
        call goes first, so a request's later stages do not queue again behind newer requests' first
        ones (FCFS by request, not by call). Under ``sticky`` (the baseline's binding) it is arrival
        alone: plain FIFO.
        """
        if key is None:
            self._seq += 1
            born = 0 if c.group.name in self.rt.table.sticky else (c.born or int(time.time() * 1_000_000))
            key = (born, self._seq)
        e = [-self.rt.table.priority(c.session, c.group.name, c.priority), key, c]
        c.qe = e
        c.pin = inst
        g = c.group
        g.queued += 1
        if inst is None:
            g.shared += 1
            heappush(g.heap, e)
        else:
            inst.queued += 1
            heappush(inst.heap, e)

    def _unqueue(self, c: Call) -> None:
        """Take a queued call out of its queue (its heap entry dies in place and is skipped later)."""
        e = c.qe
        if e is None:
            return
        e[2] = None
        c.qe = None
        g = c.group
        g.queued -= 1
        if c.pin is None:
            g.shared -= 1
        else:
            c.pin.queued -= 1
            c.pin = None

    def _queued_calls(self, g: ActorGroup) -> list[Call]:
        out = [e[2] for e in g.heap if e[2] is not None]
        for inst in g.instances:
            out.extend(e[2] for e in inst.heap if e[2] is not None)
        return out

    def _reject(self, c: Call, kind: str, type_: str, message: str) -> None:
        self.counters["rejected"] += 1
        if c.reply:
            self.rt.send(c.reply, env.encode_error(_err(kind, type_, message, c)), {env.H_ID: c.id})

    def _admits(self, inst: Instance, c: Call, is_async: bool) -> bool:
        """Whether ``inst`` can start ``c`` now: a free slot, and for a budgeted actor (a model), room
        in its budget. A call is always let in alone, so no call is too big to ever run. Under
        ``sticky`` (the baseline) there is no budget: calls are bound on arrival and the engine's own
        first-come queue takes them, as frameworks without a scheduler do."""
        if not inst.has_room(is_async):
            return False
        g = inst.group
        if not g.budgeted or g.name in self.rt.table.sticky:
            return True
        if c.cost < 0:
            c.cost = self._cost(inst, c)
        if inst.spent == 0:
            return True
        try:
            budget = inst.obj.admission_budget()  # type: ignore[attr-defined]
        except Exception:
            log.exception("%s.admission_budget failed: no budget", g.name)
            budget = None
        return budget is None or inst.spent + c.cost <= budget

    @staticmethod
    def _cost(inst: Instance, c: Call) -> int:
        try:
            return max(0, int(inst.obj.admission_cost(c.method, c.args, c.kwargs)))  # type: ignore[attr-defined]
        except Exception:  # bad arguments fail in the method itself, with their own error
            return 0

    def _pick(self, g: ActorGroup, c: Call, is_async: bool) -> Instance | None:
        """The instance with room and the least work for its weight (late binding: only now)."""
        best, best_load, fallback = None, 0.0, None
        for inst in g.instances:
            if self._admits(inst, c, is_async):
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

    def _dispatch(self, inst: Instance, c: Call) -> None:
        c.inst = inst
        inst.running += 1
        if c.cost > 0:
            inst.spent += c.cost
        if c.unit and self.sessions is not None:
            c.txn = Txn(self.sessions.store, c.unit)
        if c.qspan is not None:
            c.qspan.end()
            c.qspan = None
        g = inst.group
        if c.t0:
            g.wait_ms += ((time.monotonic() - c.t0) * 1000 - g.wait_ms) * 0.05
        if c.session is not None and g.kind_model:
            r = g.recent
            if r.get(c.session) != inst.id and len(g.fresh) < 512:
                g.fresh.append((c.session, inst.id))
            r[c.session] = inst.id
            r.move_to_end(c.session)
            if len(r) > 4096:
                r.popitem(last=False)
        if g.methods[c.method]:
            c.task = asyncio.get_running_loop().create_task(self._run_async(inst, c))
            return
        inst.sync_running += 1
        try:
            assert inst.host is not None
            inst.host.tell(c)
        except pykka.ActorDeadError:  # its thread died (it cannot, short of a bug): replace it, once
            log.error("instance %s had died; starting a new thread for it", inst.id)
            inst.host = _Host.start(self, inst)
            inst.host.tell(c)

    def _pump(self, inst: Instance) -> None:
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
            if not self._admits(inst, first[0][2], methods[first[0][2].method]):
                if not second or not self._admits(inst, second[0][2], methods[second[0][2].method]):
                    break
                heap = second
            c = heappop(heap)[2]
            self._unqueue(c)
            self._dispatch(inst, c)
            n += 1
        if n:
            self.sched_ns += time.perf_counter_ns() - t0

    def _pump_all(self, g: ActorGroup) -> None:
        for inst in g.instances:
            if not inst.draining and (inst.queued or g.shared):
                self._pump(inst)

    async def _run_async(self, inst: Instance, c: Call) -> None:
        current_call.set(c)
        current_txn.set(c.txn)
        try:
            value = await getattr(inst.obj, c.method)(*c.args, **c.kwargs)
            ok = True
        except asyncio.CancelledError:
            value, ok = None, False
        except BaseException as e:  # SystemExit or KeyboardInterrupt from user code is its error, not ours
            value, ok = error_dict(e, inst.group.name, c.method, c.id), False
        self._complete(inst, c, ok, value)

    def _run_sync(self, inst: Instance, c: Call) -> None:
        """Runs on the instance's own thread."""
        if c.done:  # cancelled or expired while it sat in the mailbox
            self.rt.post(self._complete, inst, c, False, None)
            return
        token = current_call.set(c)
        ttoken = current_txn.set(c.txn)
        try:
            value = getattr(inst.obj, c.method)(*c.args, **c.kwargs)
            ok = True
        except BaseException as e:  # never let pykka see SystemExit & co: it would stop every actor
            value, ok = error_dict(e, inst.group.name, c.method, c.id), False
        finally:
            current_txn.reset(ttoken)
            current_call.reset(token)
        self.rt.post(self._complete, inst, c, ok, value)

    def _complete(self, inst: Instance, c: Call, ok: bool, value: Any) -> None:
        inst.running -= 1
        if c.cost > 0:
            inst.spent -= c.cost
        g = inst.group
        if not g.methods[c.method]:
            inst.sync_running -= 1
        inst.handled += 1
        if c.t0:
            g.lat_ms += ((time.monotonic() - c.t0) * 1000 - g.lat_ms) * 0.05
        if not c.done:
            if ok and isinstance(value, Future):
                value.add_done_callback(partial(self._chained, c))
            else:
                self._finish(c, ok, value)
        if inst.draining:
            if inst.running == 0:
                self._retire(inst)
        elif inst.queued or g.shared:
            self._pump(inst)

    def _chained(self, c: Call, f: Future[Any]) -> None:
        """The method returned a future: its value (or error) becomes this call's."""
        if not self.rt.on_loop():
            self.rt.post(self._chained, c, f)
            return
        if f._state == 1:
            self._finish(c, True, f._value)
        else:
            err = f._value
            d = (error_dict(err, c.group.name, c.method, c.id) if isinstance(err, BaseException)
                 else _err("error", "Exception", str(err), c))
            self._finish(c, False, d)

    def _finish(self, c: Call, ok: bool, value: Any) -> None:
        """The method is done: encode its answer, commit its state changes first if it made any."""
        if c.done or c.committing:
            return
        g = c.group
        if ok:
            try:
                data = env.encode_result(value)
                env.check_size(data, {env.H_ID: c.id}, self.rt.transport.max_payload,
                               f"the result of {g.name}.{c.method}")
                writes = c.txn.changes() if c.txn is not None else None
            except (TypeError, ValueError) as e:
                ok, value = False, _err("error", type(e).__name__, str(e), c)
            else:
                if writes:
                    assert self.sessions is not None
                    c.committing = True
                    self.sessions.commit(c, writes, data)
                    return
        if not ok:
            if value is None:
                value = _err("cancelled", "Cancelled", "cancelled", c)
            data = env.encode_error(value)
        self._respond(c, ok, data, value)

    def _committed(self, c: Call, outcome: Any, body: bytes) -> None:
        """The commit's outcome (on the loop): answer, or re-run the call if it lost a race."""
        c.committing = False
        kind = outcome[0]
        if kind == "ok":
            self._respond(c, True, body)
        elif kind == "duplicate":  # an earlier attempt committed first: its answer stands
            self._respond(c, True, outcome[2])
        elif kind == "conflict" and c.conflicts < MAX_CONFLICT_RETRIES and not c.done:
            c.conflicts += 1
            c.txn = None
            c.inst = None
            self._enqueue(c)  # from its new base version
        else:
            err = outcome[1]
            self._respond(c, False, env.encode_error(
                {"kind": getattr(err, "kind", "state"), "type": getattr(err, "type", "StateError"),
                 "message": str(getattr(err, "message", err)), "actor": c.group.name, "method": c.method,
                 "traceback": "", "chain": [], "future_id": c.id}), None)

    def _fail_call(self, c: Call, kind: str, type_: str, message: str) -> None:
        self._respond(c, False, env.encode_error(_err(kind, type_, message, c)), None)

    def _respond(self, c: Call, ok: bool, data: bytes, value: Any = None) -> None:
        """Send the answer (to every caller waiting on this id) and forget the call."""
        if c.done:
            return
        c.done = True
        c.children = None
        self.active.pop(c.id, None)
        if c.wk:
            self._wheel.discard(c.wk, c)
        g = c.group
        if ok:
            self.counters["done"] += 1
            g.done += 1
        else:
            self.counters["failed"] += 1
            g.failed += 1
            if c.session is not None:
                self._note_failure(c.session)
        headers = {env.H_ID: c.id}
        if c.reply:
            self.rt.send(c.reply, data, headers)
        for r in c.also or ():
            self.rt.send(r, data, headers)
        if c.span is not None:
            self._trace_finish(c, ok, value if isinstance(value, dict) else {})
        if c.unit and self.sessions is not None:
            self.sessions.release(c)
        if not self.active:
            self._idle.set()

    # -- cancellation and deadlines ----------------------------------------------------------------
    def _abort(self, c: Call, kind: str, type_: str, message: str) -> None:
        if c.done or c.committing:  # a commit under way finishes (quickly) and is answered
            return
        if c.inst is None:
            self._unqueue(c)
        elif c.task is not None:
            c.task.cancel()
        children = c.children
        err = _err(kind, type_, message, c)
        self._respond(c, False, env.encode_error(err), err)
        for child in children or ():
            child.cancel()

    def _expire(self, c: Call) -> None:
        if not c.done:
            self.counters["expired"] += 1
            self._abort(c, "deadline", "DeadlineExceeded", "the call's deadline passed while it was queued or running")

    def _on_cancel(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            body = env.decode_json_object(data, "cancel")
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise MalformedMessage("cancel body must be {'ids': [future ids]}")
        except MalformedMessage as e:
            self.rt.count_malformed("cancel")
            if reply:
                self.rt.send(reply, env.encode_error({"kind": "bad_request", "type": "MalformedMessage",
                                                      "message": str(e)}))
            return
        for fid in ids:
            c = self.active.get(fid)
            if c is not None:
                self.counters["cancelled"] += 1
                self._abort(c, "cancelled", "Cancelled", "cancelled by its caller")

    # -- status and control --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        actors = {}
        for g in self.groups.values():
            actors[g.name] = {
                "kind": getattr(g.cls, "kind", "actor"),
                "class": f"{g.cls.__module__}:{g.cls.__qualname__}",
                "hints": g.hints.to_dict(),
                "methods": sorted(g.methods),
                "queued": g.queued,
                "running": sum(i.running for i in g.instances),
                "done": g.done,
                "failed": g.failed,
                "instances": [{"id": i.id, "running": i.running, "queued": i.queued, "limit": i.limit,
                               "handled": i.handled, "weight": i.weight, "draining": i.draining,
                               **({"admitted_cost": i.spent} if g.budgeted else {})}
                              for i in g.instances],
            }
            eng = engine_stats(g)
            if eng:
                actors[g.name]["engine"] = eng
        return {
            "node": self.name, "pid": os.getpid(), "host": socket.gethostname(), "namespace": self.rt.subjects.ns,
            "uptime_s": round(time.time() - self.started, 3), "actors": actors,
            "in_flight": len(self.active), "pending_outgoing": len(self.rt.pending),
            "armed_deadlines": len(self._wheel),
            "counters": dict(self.counters, **self.rt.counters), "malformed": dict(self.rt.malformed),
            "subjects": self.subscriptions(), "tracing": tracing.TRACER is not None,
            "state": self._state_status(),
            "decisions": self.rt.table.summary(), "control": self.control_status(),
        }

    def _state_status(self) -> dict[str, Any] | None:
        s = self.sessions
        if s is None:
            return None
        return {"path": s.store.path, "map_size": s.store.map_size(), "held": len(s.held),
                "commit_batches": s.committer.batches, "commit_ops": s.committer.ops,
                "pulled": s.pulled, "exported": s.exported, "moving": len(s.moving)}

    def _on_status(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        self._answer("status", reply, data, lambda body: self.status())

    def _on_control(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        def handle(body: dict[str, Any]) -> Any:
            op = body.get("op")
            if op == "status":
                return self.status()
            if op == "ping":
                return {"node": self.name, "pong": True}
            if op in ("export", "export_done", "pull", "units", "show", "log"):
                if self.sessions is None:
                    raise MalformedMessage(f"node {self.name} hosts no stateful actor")
                return self._state_op(op, body, reply)
            raise MalformedMessage(f"unknown control op {op!r}; known: status, ping, export, export_done, "
                                   "pull, units, show, log")
        self._answer("control", reply, data, handle)

    def _state_op(self, op: str, body: dict[str, Any], reply: str) -> Any:
        """Session-state control ops; the slow ones answer later from a task (``_LATER``)."""
        assert self.sessions is not None
        sessions = self.sessions
        session = body.get("session")
        if not isinstance(session, str) or not session:
            raise MalformedMessage(f"{op} needs a 'session'")
        if op == "units":
            return sessions.units_of(session)
        if op in ("show", "log"):
            out, held = {}, []
            for actor in sessions.units_of(session):
                u = state_keys.unit(session, actor)
                out[actor] = sessions.store.snapshot(u) if op == "show" else sessions.store.log(u)
                if u in sessions.held:
                    held.append(actor)
            return {"node": self.name, "session": session, "units": out, "held": held}
        if op == "pull":
            src = body.get("from")
            if not isinstance(src, str) or not src:
                raise MalformedMessage("pull needs 'from' (the node that holds the session)")
            asyncio.get_running_loop().create_task(self._pull_session(session, src, reply))
            return _LATER
        target = body.get("actor")
        if not isinstance(target, str) or target not in self.groups:
            raise MalformedMessage(f"{op} needs an 'actor' hosted here")
        u = state_keys.unit(session, target)
        if op == "export_done":
            sessions.confirmed(u, body.get("ok") is True)
            return _LATER
        to = body.get("to")
        if not reply or not isinstance(to, str):
            raise MalformedMessage("export needs a reply subject and 'to'")
        asyncio.get_running_loop().create_task(sessions.export(u, reply, to))
        return _LATER

    async def _pull_session(self, session: str, src: str, reply: str) -> None:
        """``migrate(session, src, here)``: bring every unit of the session that ``src`` holds."""
        assert self.sessions is not None
        t0 = time.perf_counter()
        moved, size = [], 0
        try:
            if src == self.name:
                raise ValueError("source and destination are the same node")
            msg = await self.rt.transport_request(self.rt.subjects.node(src), {"op": "units", "session": session})
            if not isinstance(msg, list):
                raise ValueError(f"node {src} answered 'units' with {type(msg).__name__}, not a list")
            for actor in msg:
                if isinstance(actor, str) and actor in self.groups:
                    size += await self.sessions.bring_here(state_keys.unit(session, actor), expect_src=src)
                    moved.append(actor)
        except Exception as e:
            if reply:
                self.rt.send(reply, env.encode_error({"kind": "state", "type": type(e).__name__, "message": str(e)}))
            return
        if reply:
            self.rt.send(reply, env.encode_result({"moved": moved, "bytes": size, "from": src, "to": self.name,
                                                   "ms": round((time.perf_counter() - t0) * 1000, 3)}))

    def _answer(self, where: str, reply: str, data: bytes, fn: Any) -> None:
        try:
            body = env.decode_json_object(data, where)
            result = fn(body)
            if result is _LATER:
                return
            out = env.encode_result(result)
            env.check_size(out, None, self.rt.transport.max_payload, f"the answer to {where}")
        except (MalformedMessage, StateError, ValueError, TypeError, KeyError) as e:
            self.rt.count_malformed(where)
            if reply:
                self.rt.send(reply, env.encode_error({"kind": "bad_request", "type": "MalformedMessage",
                                                      "message": str(e)}))
            return
        if reply:
            self.rt.send(reply, out)

    # -- tracing ------------------------------------------------------------------------------------
    def _trace_receive(self, c: Call) -> None:
        from opentelemetry.trace import SpanKind

        parent = tracing.context_from(c.traceparent)
        c.span = tracing.TRACER.start_span(
            f"{c.group.name}.{c.method}", context=parent, kind=SpanKind.SERVER,
            attributes={"nalar.future": c.id, "nalar.actor": c.group.name, "nalar.method": c.method,
                        "nalar.node": self.name, "nalar.request": c.request,
                        **({"nalar.session": c.session} if c.session else {})})
        c.otel_ctx = tracing.context_of(c.span)
        c.qspan = tracing.TRACER.start_span("queue", context=c.otel_ctx)

    def _trace_finish(self, c: Call, ok: bool, value: Any) -> None:
        if c.qspan is not None:
            c.qspan.end()
            c.qspan = None
        span, c.span = c.span, None
        if c.inst is not None:
            span.set_attribute("nalar.instance", c.inst.id)
        if not ok:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"{value.get('type')}: {str(value.get('message'))[:200]}"))
        span.end()
