"""The metrics a node reports each round, as the policy actor reads them: typed rows and entries.

A node answers ``nalar.<ns>.metrics`` with one ``NodeMetrics`` object; per actor it lists its instances
and the sessions first in line as rows. On the wire a row is a JSON list (compact: up to 32 waiting rows
per actor per node per round); here it is a ``NamedTuple`` with ``to_wire()`` and a validating
``from_wire()``. The node writes them, ``policy.api.View`` reads them.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Self, TypedDict

from ...bus.errors import MalformedMessage


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class InstanceRow(NamedTuple):
    """One instance of an actor on the reporting node."""

    id: str
    """The instance id (``Actor-node-n``)."""
    running: int
    """Calls it is running."""
    queued: int
    """Calls bound to it and waiting for it."""
    limit: int | None
    """Calls it may run at once (``None``: no limit)."""
    draining: bool
    """Killed: it takes no more calls and stops when idle."""

    def to_wire(self) -> list[Any]:
        return [self.id, self.running, self.queued, self.limit, self.draining]

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        if not isinstance(raw, list) or len(raw) != 5:
            raise MalformedMessage(f"an instance row is [id, running, queued, limit, draining], not {raw!r:.80}")
        iid, running, queued, limit, draining = raw
        if not isinstance(iid, str) or not iid or not _count(running) or not _count(queued) \
                or not (limit is None or _int(limit)) or not isinstance(draining, bool):
            raise MalformedMessage(f"a malformed instance row: {raw!r:.80}")
        return cls(iid, running, queued, limit, draining)


class WaitingRow(NamedTuple):
    """A queued call of a session, among the first in line on the reporting node."""

    session: str
    """Its session."""
    instance: str | None
    """The instance whose queue holds it; ``None``: not bound yet (in the actor's shared queue)."""
    wait_ms: float
    """How long it has waited so far."""
    stage: int
    """Calls its request made before it: later workflow stages have higher stages."""
    reentries: int
    """Failed calls of the session so far, plus one if this call is a retry."""
    priority: int
    """Its priority in the queue (higher runs first)."""

    def to_wire(self) -> list[Any]:
        return [self.session, self.instance, self.wait_ms, self.stage, self.reentries, self.priority]

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        if not isinstance(raw, list) or len(raw) != 6:
            raise MalformedMessage("a waiting row is [session, instance, wait_ms, stage, reentries, priority], "
                                   f"not {raw!r:.80}")
        session, inst, wait, stage, re, prio = raw
        if not isinstance(session, str) or not (inst is None or (isinstance(inst, str) and inst)) \
                or not isinstance(wait, (int, float)) or isinstance(wait, bool) or not _int(stage) \
                or not _int(re) or not _int(prio):
            raise MalformedMessage(f"a malformed waiting row: {raw!r:.80}")
        return cls(session, inst, float(wait), stage, re, prio)


class ActorMetrics(TypedDict, total=False):
    """One actor's entry in ``NodeMetrics["actors"]`` (readers default what is missing)."""

    kind: str  # "actor", "agent", "tool", "model"
    stateful: bool
    min: int  # its hints' min_instances and max_instances
    max: int | None
    queued: int  # calls queued on this node
    running: int
    done: int
    failed: int
    lat_ms: float  # moving averages on this node
    wait_ms: float
    provisioning: int  # instances starting
    instances: list[list[Any]]  # InstanceRow.to_wire()
    waiting: list[list[Any]]  # WaitingRow.to_wire(), first in line first
    recent: list[list[str]]  # [session, instance] newly served since the last round
    engine: dict[str, Any]  # model engine stats, per instance id
    resources: dict[str, float]  # what one instance takes (its resources hint; zero amounts left out)


class NodeMetrics(TypedDict, total=False):
    """A node's answer to the policy actor's metrics request."""

    node: str
    boot: str
    v: int  # the decisions version it has applied
    t: float
    in_flight: int
    sched: list[int]  # [scheduling ns, calls scheduled]
    actors: dict[str, ActorMetrics]
    resources: dict[str, dict[str, float]]  # {"total": {name: amount}, "used": {...}}; memory in bytes
