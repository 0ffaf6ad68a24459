"""The node: the composition root. It builds the parts, subscribes them to the bus, starts and stops.

A node subscribes to ``call.<actor>`` in queue group ``<actor>`` for each actor it hosts, so any
number of nodes share one actor type's load, and to ``call.<actor>.<node>`` for calls routed to it;
``Intake`` takes those. It also listens for cancellations, status and metrics requests, its control
subject and the policy's decisions, and sends a heartbeat every second.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
from functools import partial
from typing import Any

from ...bus import envelope as env
from ...bus.errors import BadRequest, Cancelled, MalformedMessage
from ...bus.subjects import check_token
from ..base import Actor
from ..hints import hints_of
from ..retry import HEARTBEAT_INTERVAL
from ..runtime import Runtime
from .calls import ActorGroup, Book
from .enforce import Enforcer
from .execute import Executor
from .intake import DEFAULT_MAX_QUEUE, Intake
from .queues import Scheduler
from .report import Reporter
from .resources import Capacity, NoRoom, ask_of
from .sessions import Sessions

log = logging.getLogger("nalar.node")


#: What the calls a stopping node still holds are told (its name, by default the host's, stays in its log).
_STOPPING = "the node serving the call is stopping; call again (another node or a restarted one takes it)"


def default_node_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


class Node:
    """Hosts instances of the given actor classes and serves them over the runtime's bus."""

    def __init__(self, runtime: Runtime, actors: list[tuple[type, int | None]], name: str | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, state_dir: str | None = None,
                 replicas: int | None = None, resources: dict[str, float] | None = None) -> None:
        self.rt = runtime
        self.name = check_token(name or default_node_name(), "node name")
        runtime.table.here = self.name  # sticky round-robin binds among this node's own instances
        self.state_dir = state_dir
        self.replicas = replicas  # the state stream's replica count (None: NALAR_REPLICAS, else what fits)
        self.book = book = Book(self.name, secrets.token_hex(6))
        self.executor = Executor(book, runtime)
        self.scheduler = Scheduler(book, runtime.table, self.executor.dispatch, self.executor.batcher.joins,
                                   self.executor.preempt_for)
        self.executor.queue = self.scheduler
        self.enforcer = Enforcer(book, runtime, self.scheduler, self.executor, self._serve, self._unserve)
        self.capacity = self.enforcer.capacity = Capacity.for_node(resources)  # declared, else the machine's
        self.intake = Intake(book, runtime, self.scheduler, self.executor, self.enforcer, max_queue)
        self.reporter = Reporter(book, runtime, self.scheduler, self.executor, self.enforcer, self.subscriptions)
        self.sessions: Sessions | None = None
        self._subs: list[Any] = []
        self._call_subs: list[Any] = []
        self._group_subs: dict[str, list[Any]] = {}
        self._ticker: asyncio.Task[None] | None = None
        for cls, count in actors:
            self._add_group(cls, count)

    @property
    def groups(self) -> dict[str, ActorGroup]:
        return self.book.groups

    def status(self) -> dict[str, Any]:
        return self.reporter.status()

    def metrics(self) -> dict[str, Any]:
        return self.reporter.metrics()

    def _add_group(self, cls: type, count: int | None) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not an actor class (subclass nalar.Agent, nalar.Tool or nalar.Model)")
        h = hints_of(cls)
        n = max(h.min_instances, 1) if count is None else count
        if h.max_instances is not None and n > h.max_instances:
            raise ValueError(f"{cls.__name__}: {n} instances asked for, but its max_instances hint is "
                             f"{h.max_instances}")
        g = ActorGroup(cls, h)
        if g.name in self.book.groups:
            raise ValueError(f"actor {g.name!r} is listed twice")
        if not g.methods:
            raise ValueError(f"{cls.__name__} has no public methods to serve")
        if g.streams & g.batched:
            raise ValueError(f"{cls.__name__}: a streaming method cannot be batchable: {sorted(g.streams & g.batched)}")
        if g.streams and h.stateful:
            # its items would reach the caller before its state commits, and a re-run after a lost
            # commit race would send them again
            raise ValueError(f"{cls.__name__} is stateful, so its methods cannot stream (yield): "
                             f"{sorted(g.streams)}; return the whole value instead")
        hosting = self.executor.hosting
        ask = ask_of(g.name, h)
        for k in range(n):
            why = self.capacity.lack(ask)
            if why is not None:
                raise NoRoom(f"{g.name}: instance {k + 1} of {n} does not fit on node {self.name}: {why}; "
                             "start fewer instances, or declare more (--resources)")
            inst = hosting.new(g)
            self.capacity.take(inst.id, ask)
            hosting.add(inst)
        self.book.groups[g.name] = g

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open session state, run every instance's ``on_start`` (a failure fails the start), subscribe."""
        rt = self.rt
        if any(g.hints.stateful for g in self.groups.values()):
            await self._open_state()
        for g in self.groups.values():
            for inst in g.instances:
                await self.executor.hosting.start(inst)
        for g in self.groups.values():
            if g.instances:
                await self._serve(g)
        sub = rt.transport.subscribe
        self._subs.append(await sub(rt.subjects.cancel, self._on_cancel))
        self._subs.append(await sub(rt.subjects.status, self.reporter.on_status))
        self._subs.append(await sub(rt.subjects.node(self.name), self.reporter.on_control))
        self._subs.append(await sub(rt.subjects.metrics, self.reporter.on_metrics))
        self._subs.append(await sub(rt.subjects.policy_snapshot, self.enforcer.on_snapshot_request, queue="snapshot"))
        rt.on_decisions = self.enforcer.on_decisions
        if rt.table.version:  # decisions loaded before we were listening for them
            self.enforcer.on_decisions(rt.table.snapshot_ops(), "")
        await rt.transport.flush()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _open_state(self) -> None:
        from ...bus.discovery import home

        path = self.state_dir or str(home() / "state" / self.name)
        s = await Sessions.open(self.name, self.rt, os.path.abspath(path), self.scheduler, self.executor,
                                self.replicas)
        self.sessions = s
        self.executor.state = self.enforcer.state = self.intake.state = s
        self.reporter.sessions = s

    async def _serve(self, g: ActorGroup) -> None:
        """Take ``g``'s calls: as one of its queue group, and those routed to this node."""
        if g.name in self._group_subs:
            return
        rt = self.rt
        on_call = self.intake.on_call
        subs = [await rt.transport.subscribe(rt.subjects.call(g.name), partial(on_call, g, False), queue=g.name),
                await rt.transport.subscribe(rt.subjects.call_at(g.name, self.name), partial(on_call, g, True))]
        self._group_subs[g.name] = subs
        self._call_subs.extend(subs)

    async def _unserve(self, g: ActorGroup) -> None:
        subs = self._group_subs.pop(g.name, [])
        for s in subs:
            if s in self._call_subs:
                self._call_subs.remove(s)
        await _unsubscribe(subs)

    async def _tick(self) -> None:
        """Heartbeat every second; acknowledge calls held for a second to callers that may retry."""
        hb_subject = self.rt.subjects.heartbeat(self.name)
        hb = env.dumps({"node": self.name, "boot": self.book.boot, "actors": sorted(self.groups)})
        next_hb = 0.0
        while True:
            now = time.monotonic()
            if now >= next_hb:
                self.rt.send(hb_subject, hb)
                next_hb = now + HEARTBEAT_INTERVAL
            self.intake.send_acks(now)
            await asyncio.sleep(HEARTBEAT_INTERVAL / 4)

    def subscriptions(self) -> list[str]:
        s = self.rt.subjects
        return ([s.call(g) for g in self.groups] + [s.call_at(g, self.name) for g in self.groups]
                + [s.cancel, s.status, s.node(self.name), s.metrics] + self.rt.subscriptions())

    def _on_cancel(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            body = env.decode_json_object(data, "cancel")
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise MalformedMessage("cancel body must be {'ids': [future ids]}")
        except MalformedMessage as e:
            self.rt.count_malformed("cancel")
            if reply:
                self.rt.send(reply, env.encode_error(BadRequest(str(e), type="MalformedMessage").to_wire()))
            return
        self.executor.cancel(ids)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking calls, let running ones finish for up to ``grace`` seconds, then stop instances."""
        await _unsubscribe(self._call_subs)
        self._call_subs.clear()
        book = self.book
        if book.active:
            book.idle.clear()
            try:
                await asyncio.wait_for(book.idle.wait(), grace)
            except asyncio.TimeoutError:
                pass
        ex = self.executor
        if book.active:
            log.warning("node %s is stopping: cancelling the %d calls it still holds (futures %s)", self.name,
                        len(book.active), list(book.active)[:3])
        for c in list(book.active.values()):  # still running after the grace period: answer them
            ex.abort(c, Cancelled, _STOPPING)
        for g in self.groups.values():
            for q in self.scheduler.queued_calls(g):
                ex.abort(q, Cancelled, _STOPPING)
        ex.wheel.stop()
        await ex.hosting.stop_all(grace)
        if self._ticker is not None:
            self._ticker.cancel()
        await _unsubscribe(self._subs)
        if self.sessions is not None:
            self.sessions.close()
        await self.rt.close()


async def _unsubscribe(subs: list[Any]) -> None:
    """Unsubscribe each, whatever the others do (a closed connection refuses them all)."""
    for s in subs:
        try:
            await s.unsubscribe()
        except Exception:
            pass
