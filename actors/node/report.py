"""Reporting and the control RPC: ``status``, the policy's metrics, and the node's control subject.

``metrics`` is the compact summary the policy actor decides from, in the typed rows both control
levels share (``actors/control/rows.py``); ``status`` is the full picture ``nalar status`` shows. The
control subject ``nalar.<ns>.node.<name>`` answers ``status`` and ``ping`` and the session-state ops
``units``, ``show``, ``log`` and ``pull`` (a migration's destination warming up), each of which catches
the session's units up with their log first.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable

from ...bus import envelope as env
from ...bus import tracing
from ...bus.errors import BadRequest, MalformedMessage, StateError, public_text, scrub
from ...state import keys as state_keys
from ..base import ReportsEngineStats
from ..control import InstanceRow, WaitingRow
from ..runtime import Runtime
from .calls import ActorGroup, Book
from .enforce import Enforcer
from .execute import Executor
from .queues import Scheduler
from .resources import ask_of
from .sessions import Sessions

log = logging.getLogger("nalar.node")

#: Queued sessions each actor reports per metrics round (those first in line), for head-of-line
#: migration and the priority policies.
WAITING_REPORTED = 32
#: Sessions first in line each actor shows in ``status`` (``nalar top``).
WAITING_SHOWN = 5
_LATER = object()  # a control op that answers later, from a task


class Reporter:
    """Answers status, metrics and control requests from what the other parts keep."""

    def __init__(self, book: Book, rt: Runtime, scheduler: Scheduler, executor: Executor,
                 enforcer: Enforcer, subscriptions: Callable[[], list[str]]) -> None:
        self.book = book
        self.rt = rt
        self.scheduler = scheduler
        self.executor = executor
        self.enforcer = enforcer
        self.sessions: Sessions | None = None
        self.subscriptions = subscriptions
        self.started = time.time()

    # -- metrics (for the policy actor) ---------------------------------------------------------
    def on_metrics(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if not reply:
            return
        self.enforcer.counts["metrics_sent"] += 1
        self.rt.send(reply, env.dumps(self.metrics()))

    def metrics(self) -> dict[str, Any]:
        """The compact summary the policy actor decides from."""
        now = time.monotonic()
        book = self.book
        actors = {}
        for g in book.groups.values():
            waiting = []
            for e in self.scheduler.first(g, WAITING_REPORTED):
                c = e[2]
                if c.meta.session is not None:
                    waiting.append(WaitingRow(
                        c.meta.session, c.pinned.id if c.pinned is not None else None,
                        round((now - c.arrived) * 1000, 1), c.meta.stage,
                        book.failures.get(c.meta.session, 0) + (c.meta.attempt > 0), -e[0]).to_wire())
            a: dict[str, Any] = {
                "kind": g.kind, "stateful": g.hints.stateful,
                "min": g.hints.min_instances, "max": g.hints.max_instances,
                "queued": g.queued, "running": sum(i.running for i in g.instances),
                "done": g.done, "failed": g.failed, "lat_ms": round(g.lat_ms, 2), "wait_ms": round(g.wait_ms, 2),
                "provisioning": g.provisioning, "resources": ask_of(g.name, g.hints),
                "instances": [InstanceRow(i.id, i.running, i.queued, i.limit, i.draining).to_wire()
                              for i in g.instances],
                "waiting": waiting,
            }
            if g.fresh:
                a["recent"] = g.fresh
                g.fresh = []
            stats = engine_stats(g)
            if stats is not None:
                a["engine"] = stats
            actors[g.name] = a
        return {"node": book.name, "boot": book.boot, "v": self.rt.table.version, "t": time.time(),
                "in_flight": len(book.active), "sched": [book.sched_ns, book.sched_calls], "actors": actors,
                "resources": self.enforcer.capacity.to_wire()}

    # -- status -----------------------------------------------------------------------------------
    def on_status(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        self._answer("status", reply, data, lambda body: self.status())

    def status(self) -> dict[str, Any]:
        book = self.book
        actors = {}
        for g in book.groups.values():
            actors[g.name] = {
                "kind": g.kind,
                "class": f"{g.cls.__module__}:{g.cls.__qualname__}",
                "hints": g.hints.to_dict(),
                "methods": sorted(g.methods),
                "queued": g.queued,
                "running": sum(i.running for i in g.instances),
                "done": g.done,
                "failed": g.failed,
                **self._latency(g),
                "instances": [{"id": i.id, "running": i.running, "queued": i.queued, "limit": i.limit,
                               "handled": i.handled, "weight": i.weight, "draining": i.draining,
                               **({"admitted_cost": i.spent} if g.budgeted else {})}
                              for i in g.instances],
            }
            eng = engine_stats(g)
            if eng:
                actors[g.name]["engine"] = eng
        return {
            "node": book.name, "pid": os.getpid(), "host": socket.gethostname(), "namespace": self.rt.subjects.ns,
            "uptime_s": round(time.time() - self.started, 3), "actors": actors,
            "in_flight": len(book.active), "pending_outgoing": len(self.rt.pending),
            "armed_deadlines": len(self.executor.wheel),
            "counters": dict(book.counters, **self.rt.counters), "malformed": dict(self.rt.malformed),
            "subjects": self.subscriptions(), "tracing": tracing.TRACER is not None,
            "state": self._state_status(),
            "decisions": self.rt.table.summary(), "control": self.enforcer.status(),
            "resources": self.enforcer.capacity.status(),
            **({"batching": self.executor.batcher.status()} if any(g.batched for g in book.groups.values()) else {}),
        }

    def _latency(self, g: ActorGroup) -> dict[str, Any]:
        """Run time and queue wait over the last seconds, and the sessions first in line (``nalar top``)."""
        now = time.monotonic()
        waiting: list[dict[str, Any]] = []
        seen: set[str] = set()
        for e in self.scheduler.first(g, WAITING_REPORTED):
            c = e[2]
            s = c.meta.session
            if s is not None and s not in seen and len(waiting) < WAITING_SHOWN:
                seen.add(s)
                waiting.append({"session": s, "wait_ms": round((now - c.arrived) * 1000, 1)})
        return {"latency_ms": g.run_hist.recent(now).to_dict(), "wait_ms": g.wait_hist.recent(now).to_dict(),
                "waiting": waiting}

    def _state_status(self) -> dict[str, Any] | None:
        return None if self.sessions is None else self.sessions.status()

    # -- the control subject --------------------------------------------------------------------
    def on_control(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        def handle(body: dict[str, Any]) -> Any:
            op = body.get("op")
            if op == "status":
                return self.status()
            if op == "ping":
                return {"node": self.book.name, "pong": True}
            if op in ("pull", "units", "show", "log"):
                if self.sessions is None:
                    raise MalformedMessage(f"node {self.book.name} hosts no stateful actor")
                return self._state_op(self.sessions, op, body, reply)
            raise MalformedMessage(f"unknown control op {op!r}; known: status, ping, pull, units, show, log")
        self._answer("control", reply, data, handle)

    def _state_op(self, sessions: Sessions, op: str, body: dict[str, Any], reply: str) -> Any:
        """Session-state control ops: each catches the session's units up with the log first."""
        session = body.get("session")
        if not isinstance(session, str) or not session:
            raise MalformedMessage(f"{op} needs a 'session'")
        state_keys.unit(session, "x")  # a bad session id is a clear error now, not in the task
        asyncio.get_running_loop().create_task(self._state_task(sessions, op, session, reply))
        return _LATER

    async def _state_task(self, sessions: Sessions, op: str, session: str, reply: str) -> None:
        t0 = time.perf_counter()
        try:
            actors = [a for a in await sessions.actors_of(session) if a in self.book.groups]
            if op == "units":
                result: Any = actors
            else:
                size, units = 0, {}
                for actor in actors:
                    u = state_keys.unit(session, actor)
                    size += await sessions.bring_here(u)
                    if op != "pull":
                        units[actor] = sessions.store.snapshot(u) if op == "show" else sessions.store.log(u)
                if op == "pull":
                    result = {"moved": actors, "bytes": size, "to": self.book.name,
                              "ms": round((time.perf_counter() - t0) * 1000, 3)}
                else:
                    result = {"node": self.book.name, "session": session, "units": units, "held": actors}
            out = env.encode_result(result)
            env.check_size(out, None, self.rt.transport.max_payload, f"the answer to {op}")
        except Exception as e:  # the asker hears what failed; the host details stay in this node's log
            log.warning("node %s: state %s of session %r failed: %r", self.book.name, op, session, e)
            if reply:
                self.rt.send(reply, env.encode_error(StateError(public_text(e), type=type(e).__name__).to_wire()))
            return
        if reply:
            self.rt.send(reply, out)

    def _answer(self, where: str, reply: str, data: bytes, fn: Callable[[dict[str, Any]], Any]) -> None:
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
                self.rt.send(reply, env.encode_error(BadRequest(str(e), type="MalformedMessage").to_wire()))
            return
        if reply:
            self.rt.send(reply, out)


def engine_stats(g: ActorGroup) -> dict[str, Any] | None:
    """Model engine stats (running, waiting, KV use) from instances that offer them (``ReportsEngineStats``)."""
    out: dict[str, Any] = {}
    for inst in g.instances:
        obj = inst.obj
        if isinstance(obj, ReportsEngineStats):
            try:
                out[inst.id] = obj.engine_stats()
            except Exception as e:
                out[inst.id] = {"error": scrub(repr(e))}  # it travels with the metrics
    return out or None
