"""The decisions in force: what the policy actor decided, as every process applies it locally.

The policy actor broadcasts *ops* in versioned batches; every runtime (clients and nodes alike) keeps
this table and consults it on the critical path without asking anyone: a caller picks the node a call
goes to (session routes, cache affinity, weights), a node binds calls to instances and orders its
queues with it. Ops set state, so applying one twice is harmless; the version makes late or
duplicated batches no-ops. A full snapshot (``"full": true``) replaces the table whatever its version,
so a policy actor restarted on an empty store still takes over.

=======================================================  =============================================
op                                                       meaning
=======================================================  =============================================
``["route", session, actor, instance|null]``             hard session route (``null`` removes it)
``["affinity", session, actor, instance|null]``          soft route: the session's calls go to and wait
                                                         for that instance (its cache) until the
                                                         policy moves them
``["weights", actor, {instance: weight}|null]``          share of an actor's unrouted calls
``["priority", session, value|null, actor|null]``        priority of a session's calls (at ``actor``)
``["migrate", id, session, actor, src, dst(, "soft")]``  move queued calls (and state) src -> dst; its
                                                         later calls follow by a route (by affinity if
                                                         ``"soft"``)
``["scale", node, actor, count|null, [drain ids]]``      desired instance count of actor on node
``["instance", instance, node|null]``                    where an instance lives (for callers)
``["sticky", actor, [instance, ...]|null]``              static binding: a session's calls to ``actor``
                                                         go to the instance its id hashes to; other
                                                         calls go round-robin (bound on arrival)
``["home", actor, [instance, ...]|null]``                where a session without a route or affinity
                                                         goes, softly (as ``affinity``): the instance
                                                         its id hashes to (rendezvous hashing: adding
                                                         or removing one instance moves only the
                                                         sessions it gains or loses)
=======================================================  =============================================
"""
from __future__ import annotations

import bisect
import hashlib
import random
import zlib
from typing import Any

from ..bus.errors import MalformedMessage

#: Session routes (hard and soft) kept at most, per table; the oldest go first. A bound, not a target.
MAX_SESSION_ROUTES = 200_000
OPS = ("route", "affinity", "weights", "priority", "migrate", "scale", "instance", "sticky", "home")


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise MalformedMessage(f"decision op: {what} must be a non-empty string, not {v!r}")
    return v


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def check_op(op: Any) -> list[Any]:
    """Validate one op's shape (raises ``MalformedMessage``); returns it."""
    if not isinstance(op, list) or not op or op[0] not in OPS:
        raise MalformedMessage(f"decision op must be a list starting with one of {OPS}, not {op!r:.80}")
    kind = op[0]
    n = {"route": 4, "affinity": 4, "weights": 3, "priority": 4, "migrate": 6, "scale": 5, "instance": 3, "sticky": 3,
         "home": 3}[kind]
    if len(op) != n and not (kind == "migrate" and len(op) == 7 and op[6] == "soft"):
        raise MalformedMessage(f"decision op {kind!r} has {len(op)} fields, not {n}")
    if kind in ("route", "affinity"):
        _str(op[1], "session"), _str(op[2], "actor"), _opt_str(op[3], "instance")
    elif kind == "weights":
        _str(op[1], "actor")
        w = op[2]
        if w is not None and (not isinstance(w, dict) or not all(
                isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                for k, x in w.items())):
            raise MalformedMessage("weights must map instance ids to numbers >= 0")
    elif kind == "priority":
        _str(op[1], "session"), _opt_str(op[3], "actor")
        if op[2] is not None and (not isinstance(op[2], int) or isinstance(op[2], bool)):
            raise MalformedMessage("priority must be an int or null")
    elif kind == "migrate":
        for i, what in enumerate(("id", "session", "actor", "src", "dst"), 1):
            _str(op[i], what)
    elif kind == "scale":
        _str(op[1], "node"), _str(op[2], "actor")
        if op[3] is not None and (not isinstance(op[3], int) or isinstance(op[3], bool) or op[3] < 0):
            raise MalformedMessage("scale count must be an int >= 0 or null")
        if not isinstance(op[4], list) or not all(isinstance(x, str) for x in op[4]):
            raise MalformedMessage("scale drain must be a list of instance ids")
    elif kind in ("sticky", "home"):
        _str(op[1], "actor")
        if op[2] is not None and (not isinstance(op[2], list) or not op[2] or
                                  not all(isinstance(x, str) for x in op[2])):
            raise MalformedMessage(f"{kind} instances must be a non-empty list of instance ids, or null")
    else:
        _str(op[1], "instance"), _opt_str(op[2], "node")
    return op


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
        self._rr: dict[str, int] = {}  # actor -> round-robin counter for unsessioned sticky calls
        self._node_pick: dict[str, tuple[list[str], list[float]]] = {}  # actor -> nodes, cumulative weights
        self.active = False  # anything that changes where a call goes?
        self.n_session_routes = 0

    # -- applying ----------------------------------------------------------------------------------
    def apply(self, msg: dict[str, Any]) -> list[list[Any]] | None:
        """Apply a broadcast batch; returns the ops applied, or ``None`` if it was stale or out of order.

        ``None`` with ``msg["v"] > self.version`` means a batch was missed: reload the snapshot. For a
        full snapshot, the ops returned start with ops that clear the weights, priorities and instance
        counts it no longer has, so that whoever enforces them undoes those too.
        """
        v = msg.get("v")
        ops = msg.get("ops")
        if not isinstance(v, int) or isinstance(v, bool) or not isinstance(ops, list):
            raise MalformedMessage("a decision batch is {'v': version, 'ops': [...]} ")
        for op in ops:
            check_op(op)
        cleared: list[list[Any]] = []
        if msg.get("full") is True:
            cleared = self._cleared_by(ops)
            self.reset()
        elif v <= self.version or msg.get("prev") != self.version:
            return None
        for op in ops:
            self.apply_op(op)
        self.version = v
        self._derive()
        return cleared + ops if cleared else ops

    def _cleared_by(self, ops: list[list[Any]]) -> list[list[Any]]:
        """Ops clearing the weights, priorities and counts in force that the snapshot ``ops`` leave out."""
        keep = {(op[0], op[1]) if op[0] in ("weights", "sticky", "home") else (op[0], op[1], op[3])
                if op[0] == "priority" else (op[0], op[1], op[2])
                for op in ops if op[0] in ("weights", "priority", "scale", "sticky", "home")}
        out: list[list[Any]] = [["weights", a, None] for a in self.weights if ("weights", a) not in keep]
        out.extend(["sticky", a, None] for a in self.sticky if ("sticky", a) not in keep)
        out.extend(["home", a, None] for a in self.home if ("home", a) not in keep)
        for s, per_s in self.priorities.items():
            out.extend(["priority", s, None, None if k == "*" else k] for k in per_s
                       if ("priority", s, None if k == "*" else k) not in keep)
        for node, per_n in self.scale.items():
            out.extend(["scale", node, a, None, []] for a in per_n if ("scale", node, a) not in keep)
        return out

    def reset(self) -> None:
        self.__init__(self.here)  # type: ignore[misc]

    def apply_op(self, op: list[Any]) -> None:
        kind = op[0]
        if kind in ("route", "affinity"):
            table = self.routes if kind == "route" else self.affinity
            _, session, actor, inst = op
            per = table.setdefault(actor, {})
            if inst is None:
                if per.pop(session, None) is not None:
                    self.n_session_routes -= 1
            else:
                if session not in per:
                    self.n_session_routes += 1
                    if self.n_session_routes > MAX_SESSION_ROUTES:
                        self._evict()
                per[session] = inst
        elif kind == "weights":
            if op[2] is None:
                self.weights.pop(op[1], None)
            else:
                self.weights[op[1]] = {k: float(x) for k, x in op[2].items()}
        elif kind == "priority":
            _, session, value, actor = op
            key = actor or "*"
            if value is None:
                per_s = self.priorities.get(session)
                if per_s is not None:
                    per_s.pop(key, None)
                    if not per_s:
                        del self.priorities[session]
            else:
                self.priorities.setdefault(session, {})[key] = value
        elif kind == "migrate":  # the queued calls move (nodes do that); the session's calls follow
            session, actor, dst = op[2], op[3], op[5]
            self.apply_op(["affinity" if len(op) == 7 else "route", session, actor, dst])
        elif kind == "scale":
            _, node, actor, count, drain = op
            per_n = self.scale.setdefault(node, {})
            if count is None:
                per_n.pop(actor, None)
            else:
                per_n[actor] = (count, list(drain))
        elif kind in ("sticky", "home"):
            table_s = self.sticky if kind == "sticky" else self.home
            if op[2] is None:
                table_s.pop(op[1], None)
            else:
                table_s[op[1]] = list(op[2])
        else:
            if op[2] is None:
                self.instances.pop(op[1], None)
            else:
                self.instances[op[1]] = op[2]

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

    def snapshot_ops(self) -> list[list[Any]]:
        """The table as ops (a full snapshot); migrations are actions, not state, and are not in it."""
        ops: list[list[Any]] = [["instance", i, n] for i, n in self.instances.items()]
        for kind, table in (("route", self.routes), ("affinity", self.affinity)):
            for actor, per in table.items():
                ops.extend([kind, s, actor, i] for s, i in per.items())
        ops.extend(["weights", a, dict(w)] for a, w in self.weights.items())
        ops.extend(["sticky", a, list(x)] for a, x in self.sticky.items())
        ops.extend(["home", a, list(x)] for a, x in self.home.items())
        for s, per_s in self.priorities.items():
            ops.extend(["priority", s, v, None if k == "*" else k] for k, v in per_s.items())
        for node, per_n in self.scale.items():
            ops.extend(["scale", node, a, c, list(d)] for a, (c, d) in per_n.items())
        return ops

    def summary(self) -> dict[str, Any]:
        """What ``nalar status`` shows: counts for the bulky parts, everything else in full."""
        return {
            "version": self.version,
            "session_routes": {a: len(p) for a, p in self.routes.items() if p},
            "affinity_routes": {a: len(p) for a, p in self.affinity.items() if p},
            "weights": self.weights,
            "sticky": self.sticky,
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
