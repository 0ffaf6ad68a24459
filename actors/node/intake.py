"""Admission at the edge: a call from the bus is validated, deduplicated, forwarded if it belongs on
another node, refused if it cannot be served (unknown method, past its deadline, queue full), and
otherwise accepted: armed with its deadline and handed to session admission or the scheduler.

Callers that may retry (``Nalar-Attempt`` present) are told, after ``ACK_AFTER`` seconds, that this
node (in this incarnation) still holds their call, so they keep waiting instead of sending it again.
"""
from __future__ import annotations

import time
from collections import deque

from ...bus import envelope as env
from ...bus import tracing
from ...bus.errors import BadRequest, DeadlineExceeded, MalformedMessage, Overloaded, UnknownMethod
from ...state import keys as state_keys
from ..retry import ACK_AFTER
from ..runtime import Runtime
from . import spans
from .calls import ActorGroup, Book, Bound, Call, StateGate
from .enforce import Enforcer
from .execute import Executor
from .queues import Scheduler

DEFAULT_MAX_QUEUE = 100_000


class Intake:
    """Turns messages on ``call.<actor>`` and ``call.<actor>.<node>`` into accepted calls."""

    def __init__(self, book: Book, rt: Runtime, scheduler: Scheduler, executor: Executor, enforcer: Enforcer,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.book = book
        self.rt = rt
        self.scheduler = scheduler
        self.executor = executor
        self.enforcer = enforcer
        self.state: StateGate | None = None
        self.max_queue = max_queue
        # (arrival, id) of calls whose callers may retry; ids, not calls, so answered calls die at once
        self._acks: deque[tuple[float, str]] = deque()

    def on_call(self, g: ActorGroup, direct: bool, subject: str, reply: str, data: bytes,
                headers: dict[str, str] | None) -> None:
        try:
            c = env.decode_call(data, headers, reply, Call)
        except MalformedMessage as e:
            self.rt.count_malformed("call")
            if reply:
                err = BadRequest(str(e), actor=g.name, type="MalformedMessage")
                self.rt.send(reply, env.encode_error(err.to_wire()))
            return
        t0 = time.perf_counter_ns()  # scheduling starts with a decoded call (decoding is the bus's work)
        c.group = g
        book = self.book
        book.counters["received"] += 1
        ex = self.executor
        m = c.meta
        if c.method not in g.methods:
            ex.reject(c, UnknownMethod, f"actor {g.name!r} has no method {c.method!r}; it has {sorted(g.methods)}")
            return
        running = book.active.get(m.id)
        if running is not None:  # a retry of a call still running here: it gets the same answer
            if reply and reply != running.reply:
                running.retry_replies = (running.retry_replies or []) + [reply]
            if reply and m.attempt >= 0:  # and hears at once that it is held, by a live node
                prefix, _, token = reply.rpartition(".")
                self.rt.send(prefix + ".ack", env.dumps({"node": book.name, "boot": book.boot, "ids": [token]}))
            return
        table = self.rt.table
        bound: Bound | None = None
        # A session's routing lookup is made once, here, and the scheduler reuses it; without a session it
        # would be a round-robin turn (sticky), taken only when the call binds.
        if table.active and m.session is not None:
            bound = table.instance_for(g.name, m.session)
        if table.active and m.fwd is None:  # routed elsewhere (a caller with older decisions)?
            dest = self.enforcer.elsewhere(g, c, direct, bound)
            if dest is not None and self.enforcer.forward(c, dest):
                return
        if m.session is not None and g.hints.stateful and not direct and m.fwd is None and (bound is None or bound[0] is None):
            home = self.enforcer.home(g.name, m.session)  # where the session's state is warm
            if home is not None and home != book.name and self.enforcer.forward(c, home):
                return
        now = time.time()
        if not m.deadline:  # nothing waits forever: a call without a deadline gets the default
            m.deadline = now + self.rt.default_timeout
        elif m.deadline <= now:
            ex.reject(c, DeadlineExceeded, "the call's deadline passed before it arrived")
            return
        if g.queued >= self.max_queue:
            ex.reject(c, Overloaded, f"actor {g.name!r} has {g.queued} calls queued on the node that took this "
                                     f"one (max {self.max_queue}); add instances or nodes, or slow the callers down")
            return
        if tracing.TRACER is not None:
            spans.receive(c, book.name, subject)
        c.arrived = time.monotonic()
        ex.arm(c)
        if m.attempt >= 0 and reply:
            self._acks.append((c.arrived, m.id))
        if m.session and g.hints.stateful and self.state is not None:
            try:
                c.unit = state_keys.unit(m.session, g.name)
            except ValueError as e:
                ex.fail(c, BadRequest, str(e))
                return
            self.state.admit(c)  # runs it when its state is here and its turn comes
        else:
            self.scheduler.enqueue(c, bound)
        book.sched_ns += time.perf_counter_ns() - t0
        book.sched_calls += 1

    def send_acks(self, now: float) -> None:
        """Tell the callers of calls held for ``ACK_AFTER`` seconds that this node still holds them."""
        acks: dict[str, list[str]] = {}
        q = self._acks
        active = self.book.active
        while q and q[0][0] <= now - ACK_AFTER:
            c = active.get(q.popleft()[1])
            if c is not None:
                prefix, _, token = c.reply.rpartition(".")
                acks.setdefault(prefix, []).append(token)
        book = self.book
        for prefix, tokens in acks.items():
            self.rt.send(prefix + ".ack", env.dumps({"node": book.name, "boot": book.boot, "ids": tokens}))
