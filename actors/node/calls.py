"""The node's records and the narrow seams between its parts (a leaf: it imports no other part).

``Call`` is one accepted call: the decoded wire message (``meta``, method, arguments) plus where and
how it runs. ``Instance`` is one hosted actor instance, ``ActorGroup`` all instances of one actor type
on this node with the calls waiting for them. ``Book`` is what every part may read: the node's name,
its groups and instances, its calls in flight and its counters.

The Protocols are how parts reach each other (pykka's ``ActorInbox`` seam): each crossing is a named
operation, never a private method of another part.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol

import pykka

from ...bus.envelope import CallMessage
from ...bus.errors import RemoteError
from ...state.managed import Txn
from ...state.record import Change
from ..base import Actor, Budgeted, actor_name, public_methods, streaming_methods
from ..context import CallScope
from ..hints import Hints, batched_methods
from ..histogram import Histogram

#: Sessions an actor remembers the last instance of (the policy's cache-affinity signal).
RECENT_KEPT = 4096
#: (session, instance) pairs an actor reports per metrics round at most.
FRESH_REPORTED = 512
#: Sessions whose failed calls are counted (for the re-entry count policies read), at most.
FAILURES_KEPT = 10_000
#: Distinct (error kind, type) pairs an actor counts (``/metrics`` labels); more are counted as "other".
ERROR_TYPES_KEPT = 64


class Call(CallMessage):
    """A call accepted by this node: the wire message plus where and how it runs."""

    __slots__ = ("group", "inst", "task", "scope", "span", "qspan", "otel_ctx", "done", "wk", "unit", "txn",
                 "committing", "conflicts", "retry_replies", "entry", "pinned", "arrived", "cost", "started",
                 "begun")

    group: "ActorGroup"

    def __init__(self) -> None:
        self.inst: Instance | None = None  # bound to (running on), once dispatched
        self.task: asyncio.Task[None] | None = None  # an ``async def`` method's task
        self.scope: CallScope | None = None  # what its child calls inherit, from dispatch on
        self.span: Any = None  # tracing: its server span, and the queue-wait span
        self.qspan: Any = None
        self.otel_ctx: Any = None
        self.done = False  # answered (or handed to another node): nothing more happens to it here
        self.wk = 0  # its key in the deadline wheel
        self.unit: bytes = b""  # (session, actor) for stateful calls with a session
        self.txn: Txn | None = None
        self.committing = False
        self.conflicts = 0
        self.retry_replies: list[str] | None = None  # reply subjects of retries that found it running
        self.entry: list[Any] | None = None  # its live queue entry: [-priority, (born, seq), call]
        self.pinned: Instance | None = None  # the instance whose own queue holds it
        self.arrived = 0.0  # monotonic: queue waits and latencies
        self.cost = -1  # its admission cost at a budgeted instance (-1: not counted yet)
        self.started = 0.0  # monotonic: when an instance started it (its run time)
        self.begun = False  # its ``async def`` task took its first step (a task cancelled before never does)

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def session(self) -> str | None:
        return self.meta.session


class Instance:
    """One hosted instance of an actor and the calls routed to it alone."""

    __slots__ = ("id", "group", "obj", "host", "running", "sync_running", "limit", "handled", "heap",
                 "queued", "weight", "draining", "spent")

    def __init__(self, id: str, group: "ActorGroup", obj: Actor, limit: int | None) -> None:
        self.id = id
        self.group = group
        self.obj = obj
        self.host: pykka.ActorRef[Any] | None = None  # the pykka actor of a sync instance
        self.running = 0
        self.sync_running = 0  # a def method holds the instance's one thread
        self.limit = limit
        self.handled = 0
        self.heap: list[list[Any]] = []  # calls routed to this instance
        self.queued = 0
        self.weight = 1.0  # its share of the actor's unrouted calls (policy ``weights``)
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
        self.methods = public_methods(cls)  # name -> is ``async def``
        self.streams = streaming_methods(cls)  # the async generators among them
        self.batched = batched_methods(hints, self.methods)  # the batchable ones (``batch.py``)
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
        self.wait_hist = Histogram()  # queue wait and run time, for /metrics and status (``actors/histogram.py``)
        self.run_hist = Histogram()
        self.errors: dict[tuple[str, str], int] = {}  # (error kind, type) -> calls that failed with it
        self.kind = str(getattr(cls, "kind", "actor"))
        # An instance that prices its calls and says what it can hold at once (``Budgeted``): a model
        # whose engine keeps room for its sessions' prefix caches.
        self.budgeted = issubclass(cls, Budgeted)
        self.recent: OrderedDict[str, str] = OrderedDict()  # session -> instance that last served it
        self.fresh: list[tuple[str, str]] = []  # (session, instance) pairs new since the last metrics

    def live(self) -> list[Instance]:
        return [i for i in self.instances if not i.draining]

    def waited(self, arrived: float) -> float:
        """A call that arrived at ``arrived`` starts now (returned): its queue wait, averaged and counted."""
        now = time.monotonic()
        ms = (now - arrived) * 1000
        self.wait_ms += (ms - self.wait_ms) * 0.05
        self.wait_hist.observe(ms, now)
        return now

    def ran(self, arrived: float, started: float) -> None:
        """A call's method returned: its time here averaged (``lat_ms``), its run time counted."""
        now = time.monotonic()
        self.lat_ms += ((now - arrived) * 1000 - self.lat_ms) * 0.05
        self.run_hist.observe((now - started) * 1000, now)

    def count_error(self, wire: Any) -> None:
        """One failed (or refused) call, by its error's kind and type (``/metrics``)."""
        if isinstance(wire, dict):
            key = (str(wire.get("kind", "error")), str(wire.get("type", ""))[:64])
        else:  # answered without an error body: cancelled before it ran
            key = ("cancelled", "Cancelled")
        errs = self.errors
        if key not in errs and len(errs) >= ERROR_TYPES_KEPT:  # user exception names: bounded cardinality
            key = (key[0], "other")
        errs[key] = errs.get(key, 0) + 1

    def served(self, session: str, inst: Instance) -> None:
        """Note which instance served a model's session (the affinity policy reads it)."""
        r = self.recent
        if r.get(session) != inst.id and len(self.fresh) < FRESH_REPORTED:
            self.fresh.append((session, inst.id))
        r[session] = inst.id
        r.move_to_end(session)
        if len(r) > RECENT_KEPT:
            r.popitem(last=False)


class Book:
    """What every part of a node reads and the executor updates: its groups, instances, calls in flight."""

    def __init__(self, name: str, boot: str) -> None:
        self.name = name
        self.boot = boot  # this incarnation: a restart under the same name is another node
        self.groups: dict[str, ActorGroup] = {}
        self.instances: dict[str, Instance] = {}  # every live instance on this node, by id
        self.active: dict[str, Call] = {}  # accepted and not yet answered, by future id
        self.counters = {"received": 0, "done": 0, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0,
                         "forwarded": 0}
        self.sched_ns = 0  # time the local controller spent placing calls (admission to bind or queue)
        self.sched_calls = 0
        self.idle = asyncio.Event()  # set whenever ``active`` empties (a stopping node waits for it)
        self.failures: OrderedDict[str, int] = OrderedDict()  # session -> failed calls (re-entering jobs)

    def note_failure(self, session: str) -> None:
        f = self.failures
        f[session] = f.get(session, 0) + 1
        f.move_to_end(session)
        if len(f) > FAILURES_KEPT:
            f.popitem(last=False)


# -- the seams ------------------------------------------------------------------------------------
class Queue(Protocol):
    """The scheduler as the other parts see it: calls in, calls out, no knowledge of how they run."""

    def enqueue(self, c: Call, bound: Bound | None = None) -> None: ...

    def unqueue(self, c: Call) -> None: ...

    def requeue(self, c: Call) -> None: ...

    def pump(self, inst: Instance) -> None: ...


class Answer(Protocol):
    """The executor as the other parts see it: the one way a call is answered."""

    def respond(self, c: Call, ok: bool, data: bytes, value: Any = None) -> None: ...

    def fail(self, c: Call, err: type[RemoteError], message: str) -> None: ...


class StateGate(Protocol):
    """Session admission: a stateful call runs only on a current copy of its unit and in its turn, and
    its effects are in the unit's log before its caller hears back."""

    def admit(self, c: Call) -> None: ...

    def begin(self, c: Call) -> Txn | None:
        """The transaction ``c`` runs in; ``None`` if its future is already committed in this copy (another
        attempt's, since it was admitted): then it must not run, and the gate answers it."""

    def commit(self, c: Call, changes: list[tuple[Change, bytes]], body: bytes,
               done: Callable[[Call, Any, bytes], None]) -> None: ...

    def verify(self, c: Call, body: bytes, done: Callable[[Call, Any, bytes], None]) -> None: ...

    def refresh(self, c: Call, then: Callable[[Call], None]) -> None: ...

    def release(self, c: Call) -> None: ...

    def withdraw(self, unit: bytes) -> list[Call]: ...

    async def bring_here(self, unit: bytes, expect_src: str | None = None) -> int: ...


#: How the scheduler hands a bound call to whoever runs it.
Start = Callable[[Instance, Call], None]
#: A routing lookup already made for a call: (instance id or None, whether the route is hard).
Bound = tuple["str | None", bool]
