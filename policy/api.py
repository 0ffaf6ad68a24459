"""What a policy sees (``View``) and what it may do (``Actions``): the policy primitives.

A policy is a class with ``decide(view, act)``, run once per control round in the policy actor's
single thread. ``view`` is this round's metrics from every node; ``act`` records decisions, which the
policy actor broadcasts as one versioned batch after every policy has run. Decisions are state, not
commands: routing a session where it already goes, or asking for the instance count already wanted,
is dropped, so a policy may simply say every round what it wants.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..bus.errors import MalformedMessage
from ..actors.resources import Amounts, add, check_amounts, free_of, no_room
from ..actors.control import (Affinity, DecisionTable, Home, InstanceAt, InstanceRow, Migrate, Op,
                              Order, Priority, Route, Scale, Sticky, WaitingRow, Weights)


@dataclass
class InstanceView:
    id: str
    actor: str
    node: str
    running: int
    queued: int  # calls routed to this instance and waiting for it
    limit: int | None
    draining: bool

    @property
    def idle(self) -> bool:
        return not self.draining and self.running == 0 and self.queued == 0

    @property
    def free(self) -> int:
        """Calls it could start now."""
        if self.draining:
            return 0
        return max(0, (self.limit or 64) - self.running)


@dataclass
class Waiting:
    """A queued call of a session, among the first in line on its node."""

    session: str
    actor: str
    node: str
    instance: str  # the instance whose queue holds it, or (unrouted) one of its node's instances
    routed: bool
    wait_ms: float
    stage: int  # calls its request made before it: later workflow stages have higher stages
    reentries: int  # failed calls of the session so far, plus one if this call is a retry
    priority: int


@dataclass
class ActorView:
    name: str
    kind: str
    stateful: bool
    min_instances: int
    max_instances: int | None
    instances: list[InstanceView] = field(default_factory=list)
    queued: int = 0  # deployment-wide
    running: int = 0
    lat_ms: float = 0.0  # mean over nodes of each node's moving average
    wait_ms: float = 0.0
    waiting: list[Waiting] = field(default_factory=list)  # longest wait first
    recent: list[tuple[str, str]] = field(default_factory=list)  # (session, instance) newly served
    engine: dict[str, Any] = field(default_factory=dict)  # model engine stats, per instance
    nodes_queued: dict[str, int] = field(default_factory=dict)  # node -> calls queued there
    resources: Amounts = field(default_factory=dict)  # what one instance takes (its resources hint)

    def live(self) -> list[InstanceView]:
        return [i for i in self.instances if not i.draining]

    def on(self, node: str) -> list[InstanceView]:
        return [i for i in self.instances if i.node == node and not i.draining]


class View:
    """One round's picture of the deployment, from each node's metrics (``actors.control.NodeMetrics``;
    a malformed instance or waiting row raises ``MalformedMessage``)."""

    def __init__(self, metrics: Mapping[str, Mapping[str, Any]], table: DecisionTable, round_no: int) -> None:
        self.metrics = metrics
        self.table = table  # the decisions in force before this round
        self.round = round_no
        self.nodes = sorted(metrics)
        self.actors: dict[str, ActorView] = {}
        self.instances: dict[str, InstanceView] = {}
        self.futures = 0
        self.malformed_rows = 0  # metrics rows skipped because they did not validate
        #: node -> {"total": ..., "used": ...}, for the nodes that report their resources
        self.resources: dict[str, dict[str, Amounts]] = {}
        for node in self.nodes:
            m = metrics[node]
            self._resources(node, m.get("resources"))
            self.futures += int(m.get("in_flight", 0))
            for name, a in (m.get("actors") or {}).items():
                av = self.actors.get(name)
                if av is None:
                    av = self.actors[name] = ActorView(name, a.get("kind", "actor"), bool(a.get("stateful")),
                                                       int(a.get("min", 1)), a.get("max"))
                    av.resources = self._amounts(a.get("resources") or {})
                av.queued += int(a.get("queued", 0))
                av.running += int(a.get("running", 0))
                av.nodes_queued[node] = int(a.get("queued", 0))
                av.lat_ms += float(a.get("lat_ms", 0.0)) / len(self.nodes)
                av.wait_ms += float(a.get("wait_ms", 0.0)) / len(self.nodes)
                first = None
                for raw in a.get("instances", []):
                    try:
                        r = InstanceRow.from_wire(raw)
                    except MalformedMessage:  # one bad row must not cost the round (or the node its view)
                        self.malformed_rows += 1
                        continue
                    iv = InstanceView(r.id, name, node, r.running, r.queued, r.limit, r.draining)
                    av.instances.append(iv)
                    self.instances[r.id] = iv
                    if first is None and not r.draining:
                        first = r.id
                for raw in a.get("waiting", []):
                    try:
                        w = WaitingRow.from_wire(raw)
                    except MalformedMessage:
                        self.malformed_rows += 1
                        continue
                    av.waiting.append(Waiting(w.session, name, node, w.instance or first or "", w.instance is not None,
                                              w.wait_ms, w.stage, w.reentries, w.priority))
                av.recent.extend((s, i) for s, i in a.get("recent", []))
                av.engine.update(a.get("engine") or {})
        for av in self.actors.values():
            av.waiting.sort(key=lambda w: -w.wait_ms)

    def _amounts(self, raw: Any) -> Amounts:
        try:
            return check_amounts(raw, "resources")
        except ValueError:
            self.malformed_rows += 1
            return {}

    def _resources(self, node: str, raw: Any) -> None:
        """A node's ``{"total", "used"}``; one that sends none (or a malformed one) is not checked."""
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.malformed_rows += 1
            return
        self.resources[node] = {"total": self._amounts(raw.get("total") or {}),
                                "used": self._amounts(raw.get("used") or {})}

    def free(self, node: str) -> Amounts | None:
        """What ``node`` has free as it reported it (``None``: it reports no resources)."""
        r = self.resources.get(node)
        return None if r is None else free_of(r["total"], r["used"])


class Actions:
    """The primitives. Each records an op; ``nalar.policy`` turns them into one batch per round."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.ops: list[Op] = []
        self.refused: list[str] = []
        t = view.table
        self._counts: dict[tuple[str, str], int] = {}  # (node, actor) -> instances wanted so far
        for av in view.actors.values():
            for node in view.nodes:
                want = t.scale.get(node, {}).get(av.name)
                self._counts[(node, av.name)] = want[0] if want is not None else len(av.on(node))
        self._drain: dict[tuple[str, str], list[str]] = {}
        self._free: dict[str, Amounts] = {}  # node -> free now, given this round's decisions so far
        for node in view.resources:
            free = self._free[node] = view.free(node) or {}
            for av in view.actors.values():  # provisions decided but not started yet will take theirs
                a = (view.metrics[node].get("actors") or {}).get(av.name) or {}
                pending = self._counts.get((node, av.name), 0) - len(av.on(node)) - int(a.get("provisioning", 0))
                if pending > 0 and av.resources:
                    add(free, av.resources, -float(pending))

    # -- routing --------------------------------------------------------------------------------
    def route(self, a: str, b: Any, c: Any = None) -> None:
        """``route(session, actor, instance)``: the session's calls to ``actor`` go to ``instance``
        (``None`` removes the route).

        ``route(actor, instances, weights)`` (a list, or ``None``, in second place) is the design's name
        for ``weights(actor, instances, weights)`` and does just that."""
        if isinstance(b, (list, tuple)) or b is None:
            self.weights(a, b, c)
            return
        session, actor, instance = a, b, c
        if instance is not None:
            self._known(instance)
        self.ops.append(Route(str(session), actor, instance))

    def weights(self, actor: str, instances: list[str] | tuple[str, ...] | None,
                weights: list[float] | tuple[float, ...] | None = None) -> None:
        """``actor``'s calls without a route are shared among ``instances`` in proportion to ``weights``
        (one per instance, >= 0; ``None``: equal shares); ``instances=None`` removes the weights."""
        if instances is None:
            self.ops.append(Weights(actor, None))
            return
        w = list(weights) if weights is not None else [1.0] * len(instances)
        if len(w) != len(instances) or any(x < 0 for x in w):
            raise ValueError("weights(actor, instances, weights): one weight >= 0 per instance")
        for i in instances:
            self._known(i)
        self.ops.append(Weights(actor, {i: float(x) for i, x in zip(instances, w)}))

    def affinity(self, session: str, actor: str, instance: str | None) -> None:
        """A soft route: the session's calls go to and wait for ``instance`` (its cache) until a policy
        moves them; unlike a route it lapses when the instance goes, and is evicted first."""
        if instance is not None:
            self._known(instance)
        self.ops.append(Affinity(str(session), actor, instance))

    def set_priority(self, session: str, value: int | None, actor: str | None = None) -> None:
        """Queued calls of ``session`` (at ``actor``, or everywhere) run before lower values; ``None`` clears."""
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError("a priority is an int (higher runs first)")
        self.ops.append(Priority(str(session), value, actor))

    def order(self, actor: str, weight: float | None, bound: float = 30.0) -> None:
        """Program-level scheduling at ``actor`` (``"*"``: every actor): among calls of one priority,
        the call whose program has received the least service so far goes first, as if its request
        had started ``weight`` times that service later, at most ``bound`` seconds later (the
        anti-starvation bound). ``weight=None`` ends it."""
        for v, what in ((weight, "weight"), (bound, "bound")):
            if (v is not None or what == "bound") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"order(actor, weight, bound): {what} must be a number")
        if weight is not None and not 0 < weight <= 1e6:
            raise ValueError("order(actor, weight, bound): weight in (0, 1e6], or None to end it")
        if not 0 <= bound <= 1e6:
            raise ValueError("order(actor, weight, bound): bound in [0, 1e6] seconds")
        self.ops.append(Order(str(actor), None if weight is None else float(weight), float(bound)))

    def sticky(self, actor: str, instances: list[str] | None) -> None:
        """Static binding, as frameworks without a global scheduler do: each session's calls to
        ``actor`` go to the instance its id hashes to (sessions never move), other calls round-robin;
        calls are bound on arrival and wait for their instance. ``None`` ends it."""
        self._placement(Sticky, actor, None if instances is None else list(instances))

    def home(self, actor: str, instances: list[str] | None) -> None:
        """Soft placement of new sessions: a session of ``actor`` with no route or affinity goes to the
        instance its id hashes to among ``instances`` (rendezvous hashing), as if by ``affinity``;
        every caller computes it alone, so a session's first calls already meet in one cache.
        ``None`` ends it."""
        self._placement(Home, actor, None if instances is None else sorted(instances))

    def _placement(self, kind: type[Sticky] | type[Home], actor: str, instances: list[str] | None) -> None:
        if instances is not None:
            if not instances:
                raise ValueError(f"{kind.KIND}(actor, instances): at least one instance")
            for i in instances:
                self._known(i)
        self.ops.append(kind(actor, instances))

    def migrate(self, session: str, src: str, dst: str, soft: bool = False) -> None:
        """Move the session's queued calls (and, for a stateful actor, its state) from instance ``src``
        to instance ``dst``; its later calls go to ``dst`` too: by a route, or by affinity if ``soft``
        (a model's cache: the policy may move the session again, and the route table stays small)."""
        s, d = self._known(src), self._known(dst)
        if s.actor != d.actor:
            raise ValueError(f"migrate: {src} and {dst} are instances of different actors")
        self.ops.append(Migrate(secrets.token_hex(6), str(session), s.actor, src, dst, bool(soft)))

    # -- resources ------------------------------------------------------------------------------
    def provision(self, actor: str, node: str) -> bool:
        """One more instance of ``actor`` on ``node`` (which must host it), within ``max_instances`` and
        where its ``resources`` hint fits in what the node has free."""
        why = self._no_provision(actor, node)
        if why is not None:
            self.refused.append(f"provision({actor}, {node}): {why}")
            return False
        key = (node, actor)
        self._counts[key] += 1
        if node in self._free:
            add(self._free[node], self.view.actors[actor].resources, -1.0)
        self._emit_scale(key)
        return True

    def kill(self, instance: str) -> bool:
        """Drain and stop ``instance``, never below the actor's ``min_instances`` (at least 1) in all.

        Killing an instance already draining (or already killed this round) changes nothing."""
        iv = self._known(instance)
        key = (iv.node, iv.actor)
        if iv.draining or instance in self._drain.get(key, ()):
            return True
        why = self._no_kill(iv)
        if why is not None:
            self.refused.append(f"kill({instance}): {why}")
            return False
        self._counts[key] -= 1
        self._drain.setdefault(key, []).append(instance)
        if iv.node in self._free:  # a draining instance's resources are free at once (the node does the same)
            add(self._free[iv.node], self.view.actors[iv.actor].resources)
        self._emit_scale(key)
        return True

    def can_provision(self, actor: str, node: str, freeing: str | None = None) -> bool:
        """Would ``provision(actor, node)`` be allowed now (given this round's decisions so far)? With
        ``freeing``, an instance on ``node``: would it be once ``kill(freeing)`` released its resources?"""
        return self._no_provision(actor, node, freeing) is None

    def room(self, node: str) -> Amounts | None:
        """What ``node`` has free given this round's decisions so far (``None``: it reports no resources)."""
        free = self._free.get(node)
        return None if free is None else dict(free)

    def can_kill(self, instance: str) -> bool:
        """Would ``kill(instance)`` be allowed now (given this round's decisions so far)?"""
        return self._no_kill(self._known(instance)) is None

    def _no_provision(self, actor: str, node: str, freeing: str | None = None) -> str | None:
        av = self.view.actors.get(actor)
        if av is None or node not in self.view.nodes or actor not in (self.view.metrics[node].get("actors") or {}):
            return f"node does not host {actor}"
        if av.max_instances is not None and self._total(actor) >= av.max_instances:
            return f"already at max_instances={av.max_instances}"
        free = self._free.get(node)
        if free is None or not av.resources:
            return None
        iv = None if freeing is None else self._known(freeing)
        if iv is not None and iv.node == node and not iv.draining and freeing not in self._drain.get((node, iv.actor), ()):
            free = dict(free)
            add(free, self.view.actors[iv.actor].resources)
        why = no_room(av.resources, free, self.view.resources[node]["total"])
        return None if why is None else f"no room on {node}: {why}"

    def _no_kill(self, iv: InstanceView) -> str | None:
        av = self.view.actors[iv.actor]
        if self._total(iv.actor) <= max(1, av.min_instances):
            return f"{iv.actor} is at min_instances={max(1, av.min_instances)}"
        return None

    def _emit_scale(self, key: tuple[str, str]) -> None:
        node, actor = key
        self.ops = [op for op in self.ops if not (isinstance(op, Scale) and op.node == node and op.actor == actor)]
        self.ops.append(Scale(node, actor, max(0, self._counts[key]), list(self._drain.get(key, []))))

    def _total(self, actor: str) -> int:
        return sum(n for (node, a), n in self._counts.items() if a == actor)

    def _known(self, instance: str) -> InstanceView:
        iv = self.view.instances.get(instance)
        if iv is None:
            raise ValueError(f"no instance {instance!r} in this round's metrics")
        return iv

    # -- the batch ------------------------------------------------------------------------------
    def batch(self) -> list[Op]:
        """This round's ops, minus those that change nothing, plus where new instances live."""
        t = self.view.table
        out: list[Op] = [op for op in (InstanceAt(iid, iv.node) for iid, iv in self.view.instances.items())
                         if not op.unchanged(t)]
        for node in self.view.nodes:  # instances a node no longer lists are gone
            out.extend(InstanceAt(iid, None) for iid, n in t.instances.items()
                       if n == node and iid not in self.view.instances)
        out.extend(op for op in self.ops if not op.unchanged(t))
        return out


class Policy:
    """Subclass and implement ``decide``; keep state across rounds on ``self`` if you need it."""

    #: The name ``nalar policy --policies`` and ``nalar status`` use (the class name if unset).
    name: str = ""

    def decide(self, view: View, act: Actions) -> None:
        raise NotImplementedError
