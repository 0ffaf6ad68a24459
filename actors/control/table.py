"""The decisions in force: what the policy actor decided, as every process applies it locally.

The policy actor broadcasts ops (``ops.py``) in versioned batches; every runtime (clients and nodes
alike) keeps this table and consults it on the critical path without asking anyone: a caller picks the
node a call goes to (session routes, cache affinity, weights), a node binds calls to instances and
orders its queues with it. Ops set state, so applying one twice is harmless; the version makes late or
duplicated batches no-ops. A full snapshot (``"full": true``) replaces the table whatever its version,
so a policy actor restarted on an empty store still takes over.

A batch on the wire (``nalar.<ns>.policy``, and the snapshot in the KV bucket)::

    {"v": version, "prev": the version it follows, "ops": [op as a list, ...], "full": true (a snapshot),
     "term": the term of the leader that sent it (``term.py``)}
"""
from __future__ import annotations

import bisect
import hashlib
import random
import zlib
from typing import Any

from ...bus.errors import MalformedMessage
from .ops import Affinity, Home, InstanceAt, Op, Order, Priority, Route, Scale, Sticky, Weights, op_from_wire

#: Session routes (hard and soft) kept at most, per table; the oldest go first. A bound, not a target.
MAX_SESSION_ROUTES = 200_000
#: The kinds of state a snapshot rebuilds, in the order it lists them.
STATE = (InstanceAt, Route, Affinity, Weights, Sticky, Home, Priority, Scale, Order)
#: The kinds of state a node enforces beyond reading the table (re-weighted or re-ordered queues,
#: instance counts): a full snapshot that leaves one out clears it, so that enforcement undoes it too.
ENFORCED = (Weights, Sticky, Home, Priority, Scale)


class DecisionTable:
    """The routing table, priorities and desired instance counts in force in this process."""

    def __init__(self, here: str | None = None) -> None:
        self.here = here  # this process's node name, if it is a node (round-robin binds among its own)
        self.version = 0
        self.instances: dict[str, str] = {}  # instance -> node
        self.routes: dict[str, dict[str, str]] = {}  # actor -> session -> instance (hard)
        self.affinity: dict[str, dict[str, str]] = {}  # actor -> session -> instance (soft)
        self.weights: dict[str, dict[str, float]] = {}  # actor -> instance -> weight
        self.priorities: dict[str, dict[str, int]] = {}  # session -> actor or "*" -> priority
        self.scale: dict[str, dict[str, tuple[int, list[str]]]] = {}  # node -> actor -> (count, drain)
        self.sticky: dict[str, list[str]] = {}  # actor -> instances sessions hash onto (baseline binding)
        self.home: dict[str, list[str]] = {}  # actor -> instances sessions hash onto, softly
        self.order: dict[str, tuple[float, float]] = {}  # actor or "*" -> (weight, bound s): program-level order
        self._rr: dict[str, int] = {}  # actor -> round-robin counter for unsessioned sticky calls
        self._node_pick: dict[str, tuple[list[str], list[float]]] = {}  # actor -> nodes, cumulative weights
        self.active = False  # anything that changes where a call goes?
        self.n_session_routes = 0

    # -- applying ----------------------------------------------------------------------------------
    def apply(self, msg: dict[str, Any]) -> list[Op] | None:
        """Apply a broadcast batch (its wire form); returns the ops applied, or ``None`` if it was stale
        or out of order.

        ``None`` with ``msg["v"] > self.version`` means a batch was missed: reload the snapshot. For a
        full snapshot, the ops returned start with ops that clear the weights, priorities and instance
        counts it no longer has, so that whoever enforces them undoes those too. A batch with one
        malformed op applies nothing (``MalformedMessage``).
        """
        v = msg.get("v")
        raw = msg.get("ops")
        if not isinstance(v, int) or isinstance(v, bool) or not isinstance(raw, list):
            raise MalformedMessage("a decision batch is {'v': version, 'ops': [...]} ")
        ops = [op_from_wire(op) for op in raw]
        cleared: list[Op] = []
        if msg.get("full") is True:
            cleared = self._cleared_by(ops)
            self.reset()
        elif v <= self.version or msg.get("prev") != self.version:
            return None
        for op in ops:
            op.apply(self)
        self.version = v
        self._derive()
        return cleared + ops if cleared else ops

    def _cleared_by(self, ops: list[Op]) -> list[Op]:
        """Ops clearing the enforced state in force (``ENFORCED``) that the snapshot ``ops`` leave out."""
        keep = {op.key() for op in ops if isinstance(op, ENFORCED)}
        return [op.cleared() for kind in ENFORCED for op in kind.in_force(self) if op.key() not in keep]

    def reset(self) -> None:
        self.__init__(self.here)  # type: ignore[misc]

    def apply_op(self, op: Op) -> None:
        op.apply(self)

    def set_session_route(self, table: dict[str, dict[str, str]], session: str, actor: str,
                          instance: str | None) -> None:
        """Set (``None``: remove) a hard or soft route in ``table``, within ``MAX_SESSION_ROUTES``."""
        per = table.setdefault(actor, {})
        if instance is None:
            if per.pop(session, None) is not None:
                self.n_session_routes -= 1
        else:
            if session not in per:
                self.n_session_routes += 1
                if self.n_session_routes > MAX_SESSION_ROUTES:
                    self._evict()
            per[session] = instance

    def _evict(self) -> None:
        for table in (self.affinity, self.routes):  # soft routes go first
            for per in table.values():
                if per:
                    del per[next(iter(per))]
                    self.n_session_routes -= 1
                    return

    def _derive(self) -> None:
        """Per-actor node weights for callers: the sum of the weights of each node's instances."""
        self._node_pick = {}
        for actor, w in self.weights.items():
            per_node: dict[str, float] = {}
            for inst, x in w.items():
                node = self.instances.get(inst)
                if node is not None and x > 0:
                    per_node[node] = per_node.get(node, 0.0) + x
            if per_node:
                nodes = sorted(per_node)
                cum, total = [], 0.0
                for n in nodes:
                    total += per_node[n]
                    cum.append(total)
                self._node_pick[actor] = (nodes, cum)
        self.active = bool(self._node_pick or self.sticky or self.home or any(self.routes.values())
                           or any(self.affinity.values()))

    # -- reading -----------------------------------------------------------------------------------
    def node_for(self, actor: str, session: str | None) -> str | None:
        """Where a caller should send a call: a node, or ``None`` for any node serving ``actor``."""
        if session is not None:
            inst, _ = self.instance_for(actor, session)  # its route, affinity, sticky hash or home
            if inst is not None:
                node = self.instances.get(inst)
                if node is not None:
                    return node
        st = self.sticky.get(actor)
        if st:
            return self.instances.get(_hashed(st, session) if session is not None else self._next(actor, st))
        pick = self._node_pick.get(actor)
        if pick is None:
            return None
        nodes, cum = pick
        if len(nodes) == 1:
            return nodes[0]
        return nodes[bisect.bisect_left(cum, random.random() * cum[-1])]

    def instance_for(self, actor: str, session: str | None) -> tuple[str | None, bool]:
        """The instance a call should bind to, and whether the route is hard."""
        st = self.sticky.get(actor)
        if session is None:
            if st and self.here is not None:  # round-robin among this node's instances of the list
                mine = [i for i in st if self.instances.get(i) == self.here]
                if mine:
                    return self._next(actor, mine), True
            return None, False
        r = self.routes.get(actor)
        if r:
            inst = r.get(session)
            if inst is not None:
                return inst, True
        a = self.affinity.get(actor)
        if a:
            inst = a.get(session)
            if inst is not None:
                return inst, False
        if st:
            return _hashed(st, session), True
        h = self.home.get(actor)
        if h:
            return home_of(h, session), False
        return None, False

    def _next(self, actor: str, insts: list[str]) -> str:
        """Round-robin over ``insts`` (one counter per actor)."""
        n = self._rr[actor] = self._rr.get(actor, -1) + 1
        return insts[n % len(insts)]

    def ordering(self, actor: str) -> tuple[float, float] | None:
        """``actor``'s program-level order (``Order``): (weight, bound in seconds), or ``None``."""
        o = self.order
        if not o:
            return None
        got = o.get(actor)
        return got if got is not None else o.get("*")

    def priority(self, session: str | None, actor: str, default: int) -> int:
        if session is None or not self.priorities:
            return default
        p = self.priorities.get(session)
        if p is None:
            return default
        v = p.get(actor)
        if v is None:
            v = p.get("*")
        return default if v is None else v

    def snapshot_ops(self) -> list[Op]:
        """The table as ops (a full snapshot); migrations are actions, not state, and are not in it."""
        ops: list[Op] = []
        for kind in STATE:
            ops.extend(kind.in_force(self))
        return ops

    def summary(self) -> dict[str, Any]:
        """What ``nalar status`` shows: counts for the bulky parts, everything else in full."""
        return {
            "version": self.version,
            "session_routes": {a: len(p) for a, p in self.routes.items() if p},
            "affinity_routes": {a: len(p) for a, p in self.affinity.items() if p},
            "weights": self.weights,
            "sticky": self.sticky,
            "order": {a: {"weight": w, "bound_s": b} for a, (w, b) in self.order.items()},
            "home": self.home,
            "priorities": len(self.priorities),
            "scale": {n: {a: c for a, (c, _) in per.items()} for n, per in self.scale.items() if per},
        }


def _hashed(insts: list[str], session: str) -> str:
    """The instance a session is pinned to by ``sticky``: a stable hash, the same in every process."""
    return insts[zlib.crc32(session.encode()) % len(insts)]


def home_of(insts: list[str], session: str) -> str:
    """A session's ``home``: the instance with the highest hash of (session, instance), the same in
    every process; adding or removing an instance moves only the sessions that instance gains or loses."""
    key = session.encode() + b"\0"
    return max(insts, key=lambda i: hashlib.blake2b(key + i.encode(), digest_size=8).digest())
