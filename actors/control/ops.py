"""Decision ops: one small typed class per kind, each with its own validation, effect and no-op test.

On the wire an op is a JSON list whose first element is its kind (the table in ``__init__``); here it
is a small frozen dataclass with that kind as ``KIND`` (a ``NamedTuple`` cannot hold a typed class
constant). Each class knows, for its kind alone:

- ``from_wire(raw)`` / ``to_wire()``: the list form, validated on the way in (``MalformedMessage``);
- ``apply(table)``: what it sets in a ``DecisionTable``;
- ``unchanged(table)``: whether the table already holds it (the policy side drops such ops);
- for state a node enforces beyond reading the table (weights, priorities, instance counts, sticky and
  home bindings): ``key()``, what it sets, and ``cleared()``, the op that undoes it; a full snapshot
  that leaves a key out clears it, so that enforcement undoes it too;
- for state (every kind but ``Migrate``): ``in_force(table)``, the ops that rebuild what the table holds.

``op_from_wire`` picks the class by kind. Ops only read and write the table's dicts (``Tables``), so
this module imports nothing from ``table.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, Union

from ...bus.errors import MalformedMessage


class Tables(Protocol):
    """What an op reads and writes: the dicts of a ``DecisionTable`` (see ``table.py``)."""

    instances: dict[str, str]
    routes: dict[str, dict[str, str]]
    affinity: dict[str, dict[str, str]]
    weights: dict[str, dict[str, float]]
    priorities: dict[str, dict[str, int]]
    scale: dict[str, dict[str, tuple[int, list[str]]]]
    sticky: dict[str, list[str]]
    home: dict[str, list[str]]
    order: dict[str, tuple[float, float]]

    def set_session_route(self, table: dict[str, dict[str, str]], session: str, actor: str,
                          instance: str | None) -> None: ...


# -- validation helpers ------------------------------------------------------------------------------
def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise MalformedMessage(f"decision op: {what} must be a non-empty string, not {v!r}")
    return v


def _opt_str(v: Any, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(kind: str, raw: Any, n: int) -> list[Any]:
    """``raw``, once it is a list of ``n`` elements starting with ``kind``."""
    if not isinstance(raw, list) or not raw or raw[0] != kind:
        raise MalformedMessage(f"decision op {kind!r} must be a list starting with {kind!r}, not {raw!r:.80}")
    if len(raw) != n:
        raise MalformedMessage(f"decision op {kind!r} has {len(raw)} fields, not {n}")
    return raw


def _instance_list(kind: str, v: Any) -> list[str] | None:
    if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v)):
        raise MalformedMessage(f"{kind} instances must be a non-empty list of instance ids, or null")
    return v


def _routed(table: dict[str, dict[str, str]], session: str, actor: str) -> str | None:
    return table.get(actor, {}).get(session)


# -- the ops -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _SessionRoute:
    """What ``Route`` and ``Affinity`` share: a session's calls to one actor go to one instance."""

    session: str
    """The session whose calls it routes."""
    actor: str
    """The actor whose calls it routes (a session's calls to other actors go their own way)."""
    instance: str | None
    """Where they go; ``None`` removes the route."""

    KIND: ClassVar[str] = ""

    @staticmethod
    def _of(table: Tables) -> dict[str, dict[str, str]]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, session, actor, instance = _shape(cls.KIND, raw, 4)
        return cls(_str(session, "session"), _str(actor, "actor"), _opt_str(instance, "instance"))

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.session, self.actor, self.instance]

    def apply(self, table: Tables) -> None:
        table.set_session_route(self._of(table), self.session, self.actor, self.instance)

    def unchanged(self, table: Tables) -> bool:
        return _routed(self._of(table), self.session, self.actor) == self.instance

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(s, actor, i) for actor, per in cls._of(table).items() for s, i in per.items()]


@dataclass(frozen=True, slots=True)
class Route(_SessionRoute):
    """A hard session route: the session's calls to ``actor`` go to ``instance``."""

    KIND: ClassVar[str] = "route"

    @staticmethod
    def _of(table: Tables) -> dict[str, dict[str, str]]:
        return table.routes


@dataclass(frozen=True, slots=True)
class Affinity(_SessionRoute):
    """A soft route: the session's calls go to and wait for ``instance`` (its cache) until the policy
    moves them; evicted before hard routes, and void once the instance is gone."""

    KIND: ClassVar[str] = "affinity"

    @staticmethod
    def _of(table: Tables) -> dict[str, dict[str, str]]:
        return table.affinity


@dataclass(frozen=True, slots=True)
class Weights:
    """The share of an actor's unrouted calls each of its instances gets."""

    actor: str
    """The actor whose calls are shared."""
    weights: dict[str, float] | None
    """Instance id to weight (>= 0; 0: none); ``None`` removes the weights (the queue group decides)."""

    KIND: ClassVar[str] = "weights"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, actor, w = _shape(cls.KIND, raw, 3)
        _str(actor, "actor")
        if w is not None and (not isinstance(w, dict) or not all(
                isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                for k, x in w.items())):
            raise MalformedMessage("weights must map instance ids to numbers >= 0")
        return cls(actor, w)

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.actor, self.weights]

    def apply(self, table: Tables) -> None:
        if self.weights is None:
            table.weights.pop(self.actor, None)
        else:
            table.weights[self.actor] = {k: float(x) for k, x in self.weights.items()}

    def unchanged(self, table: Tables) -> bool:
        cur, w = table.weights.get(self.actor), self.weights
        return cur == w or (cur is not None and w is not None and cur.keys() == w.keys()
                            and all(abs(cur[k] - w[k]) < 1e-9 for k in cur))

    def key(self) -> tuple[str, ...]:
        return (self.KIND, self.actor)

    def cleared(self) -> Weights:
        return Weights(self.actor, None)

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(a, dict(w)) for a, w in table.weights.items()]


@dataclass(frozen=True, slots=True)
class Priority:
    """The priority of a session's queued calls: higher runs first."""

    session: str
    """The session whose calls it orders."""
    value: int | None
    """The priority; ``None`` clears it (calls keep the priority their caller gave them)."""
    actor: str | None = None
    """At this actor only, or (``None``) at every actor; a per-actor value wins over the other."""

    KIND: ClassVar[str] = "priority"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, session, value, actor = _shape(cls.KIND, raw, 4)
        _str(session, "session"), _opt_str(actor, "actor")
        if value is not None and not _int(value):
            raise MalformedMessage("priority must be an int or null")
        return cls(session, value, actor)

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.session, self.value, self.actor]

    def apply(self, table: Tables) -> None:
        key = self.actor or "*"
        if self.value is None:
            per_s = table.priorities.get(self.session)
            if per_s is not None:
                per_s.pop(key, None)
                if not per_s:
                    del table.priorities[self.session]
        else:
            table.priorities.setdefault(self.session, {})[key] = self.value

    def unchanged(self, table: Tables) -> bool:
        return table.priorities.get(self.session, {}).get(self.actor or "*") == self.value

    def key(self) -> tuple[str | None, ...]:
        return (self.KIND, self.session, self.actor)

    def cleared(self) -> Priority:
        return Priority(self.session, None, self.actor)

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(s, v, None if k == "*" else k) for s, per_s in table.priorities.items() for k, v in per_s.items()]


@dataclass(frozen=True, slots=True)
class Order:
    """Program-level scheduling at ``actor`` (``"*"``: every actor): among calls of one priority, the
    queue serves first the call whose program (its request) has received the least service so far,
    along its critical path (Autellix's PLAS, and ATLAS for programs that fan out).

    A call is queued as if its request had started ``weight`` times its program's service later
    than it did, but never more than ``bound`` seconds later: the anti-starvation bound. No call waits
    behind a call of a request that started more than ``bound`` seconds after its own.
    """

    actor: str
    """The actor whose queues it orders, or ``"*"``."""
    weight: float | None
    """Seconds of queue position per second of service; ``None`` ends the order (first come, first
    served by request again)."""
    bound: float
    """The anti-starvation bound, seconds (>= 0)."""

    KIND: ClassVar[str] = "order"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, actor, weight, bound = _shape(cls.KIND, raw, 4)
        _str(actor, "actor")
        if weight is not None and (not _number(weight) or not 0 < weight <= 1e6):
            raise MalformedMessage("order weight must be a number in (0, 1e6], or null")
        if not _number(bound) or not 0 <= bound <= 1e6:
            raise MalformedMessage("order bound must be a number of seconds in [0, 1e6]")
        return cls(actor, None if weight is None else float(weight), float(bound))

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.actor, self.weight, self.bound]

    def apply(self, table: Tables) -> None:
        if self.weight is None:
            table.order.pop(self.actor, None)
        else:
            table.order[self.actor] = (self.weight, self.bound)

    def unchanged(self, table: Tables) -> bool:
        cur = table.order.get(self.actor)
        return (cur is None) if self.weight is None else cur == (self.weight, self.bound)

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(a, w, b) for a, (w, b) in table.order.items()]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass(frozen=True, slots=True)
class Migrate:
    """Move a session's queued calls (and, for a stateful actor, its state) from ``src`` to ``dst``.

    An action, not state: nodes carry it out once; in the table it leaves the route (or, if ``soft``,
    the affinity) its later calls follow to ``dst``. It is never part of a snapshot."""

    id: str
    """This migration's id (for errors and logs)."""
    session: str
    """The session that moves."""
    actor: str
    """The actor whose instances ``src`` and ``dst`` are."""
    src: str
    """The instance it leaves."""
    dst: str
    """The instance it goes to."""
    soft: bool = False
    """Its later calls follow by affinity (a model's cache), not by a hard route (on the wire: a
    seventh element ``"soft"``)."""

    KIND: ClassVar[str] = "migrate"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        soft = isinstance(raw, list) and len(raw) == 7 and raw[6] == "soft"
        _, mid, session, actor, src, dst = _shape(cls.KIND, raw[:6] if soft else raw, 6)
        return cls(_str(mid, "id"), _str(session, "session"), _str(actor, "actor"), _str(src, "src"),
                   _str(dst, "dst"), soft)

    def to_wire(self) -> list[Any]:
        out = [self.KIND, self.id, self.session, self.actor, self.src, self.dst]
        return out + ["soft"] if self.soft else out

    def apply(self, table: Tables) -> None:  # the queued calls move (nodes do that); the session's calls follow
        table.set_session_route(table.affinity if self.soft else table.routes, self.session, self.actor, self.dst)

    def unchanged(self, table: Tables) -> bool:
        return False  # an action: each one is carried out


@dataclass(frozen=True, slots=True)
class Scale:
    """The number of instances of an actor a node should run."""

    node: str
    """The node."""
    actor: str
    """The actor (which the node must host)."""
    count: int | None
    """How many (>= 0); ``None`` removes the wish (the node keeps what it runs)."""
    drain: list[str]
    """Instances to drain first, if it runs more than ``count``."""

    KIND: ClassVar[str] = "scale"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, node, actor, count, drain = _shape(cls.KIND, raw, 5)
        _str(node, "node"), _str(actor, "actor")
        if count is not None and (not _int(count) or count < 0):
            raise MalformedMessage("scale count must be an int >= 0 or null")
        if not isinstance(drain, list) or not all(isinstance(x, str) for x in drain):
            raise MalformedMessage("scale drain must be a list of instance ids")
        return cls(node, actor, count, drain)

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.node, self.actor, self.count, list(self.drain)]

    def apply(self, table: Tables) -> None:
        per_n = table.scale.setdefault(self.node, {})
        if self.count is None:
            per_n.pop(self.actor, None)
        else:
            per_n[self.actor] = (self.count, list(self.drain))

    def unchanged(self, table: Tables) -> bool:
        cur = table.scale.get(self.node, {}).get(self.actor)
        return cur is not None and cur[0] == self.count

    def key(self) -> tuple[str, ...]:
        return (self.KIND, self.node, self.actor)

    def cleared(self) -> Scale:
        return Scale(self.node, self.actor, None, [])

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(node, a, c, list(d)) for node, per_n in table.scale.items() for a, (c, d) in per_n.items()]


@dataclass(frozen=True, slots=True)
class InstanceAt:
    """Where an instance lives, for callers (the node whose subject its calls go to)."""

    instance: str
    """The instance id."""
    node: str | None
    """Its node; ``None``: it is gone."""

    KIND: ClassVar[str] = "instance"

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, instance, node = _shape(cls.KIND, raw, 3)
        return cls(_str(instance, "instance"), _opt_str(node, "node"))

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.instance, self.node]

    def apply(self, table: Tables) -> None:
        if self.node is None:
            table.instances.pop(self.instance, None)
        else:
            table.instances[self.instance] = self.node

    def unchanged(self, table: Tables) -> bool:
        return table.instances.get(self.instance) == self.node

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(i, n) for i, n in table.instances.items()]


@dataclass(frozen=True, slots=True)
class _Binding:
    """What ``Sticky`` and ``Home`` share: the instances an actor's sessions hash onto."""

    actor: str
    """The actor bound."""
    instances: list[str] | None
    """The instances sessions hash onto (not empty); ``None`` ends it."""

    KIND: ClassVar[str] = ""

    @staticmethod
    def _of(table: Tables) -> dict[str, list[str]]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Self:
        _, actor, instances = _shape(cls.KIND, raw, 3)
        return cls(_str(actor, "actor"), _instance_list(cls.KIND, instances))

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.actor, self.instances]

    def apply(self, table: Tables) -> None:
        if self.instances is None:
            self._of(table).pop(self.actor, None)
        else:
            self._of(table)[self.actor] = list(self.instances)

    def unchanged(self, table: Tables) -> bool:
        return self._of(table).get(self.actor) == self.instances

    def key(self) -> tuple[str, ...]:
        return (self.KIND, self.actor)

    def cleared(self) -> Self:
        return type(self)(self.actor, None)

    @classmethod
    def in_force(cls, table: Tables) -> list[Self]:
        return [cls(a, list(x)) for a, x in cls._of(table).items()]


@dataclass(frozen=True, slots=True)
class Sticky(_Binding):
    """Static binding: a session's calls to ``actor`` go to the instance its id hashes to; other calls
    go round-robin (bound on arrival)."""

    KIND: ClassVar[str] = "sticky"

    @staticmethod
    def _of(table: Tables) -> dict[str, list[str]]:
        return table.sticky


@dataclass(frozen=True, slots=True)
class Home(_Binding):
    """Where a session without a route or affinity goes, softly (as ``Affinity``): the instance its id
    hashes to (rendezvous hashing: adding or removing one instance moves only the sessions it gains or
    loses)."""

    KIND: ClassVar[str] = "home"

    @staticmethod
    def _of(table: Tables) -> dict[str, list[str]]:
        return table.home


Op = Union[Route, Affinity, Weights, Priority, Migrate, Scale, InstanceAt, Sticky, Home, Order]
#: Op classes by wire name.
KINDS: dict[str, type[Op]] = {c.KIND: c for c in (Route, Affinity, Weights, Priority, Migrate, Scale, InstanceAt,
                                                   Sticky, Home, Order)}
OPS = tuple(KINDS)


def op_from_wire(raw: Any) -> Op:
    """One op from its list form, validated (raises ``MalformedMessage``)."""
    cls = KINDS.get(raw[0]) if isinstance(raw, list) and raw and isinstance(raw[0], str) else None
    if cls is None:
        raise MalformedMessage(f"decision op must be a list starting with one of {OPS}, not {raw!r:.80}")
    return cls.from_wire(raw)
