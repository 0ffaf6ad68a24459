"""Enforcement: how a node carries out the policy actor's decisions, and forwards what is not its own.

Every node applies each decision batch itself, event-driven, with no round trip: new priorities
reorder its queues; a ``migrate`` hands the session's queued calls to the destination's node (which
catches the session's state up from its log first); ``scale`` starts or drains instances within the
hints' bounds and the node's room (``resources.py``); weights and session routes are read when each
call is bound. A call that arrives at a node the
decisions in force do not send it to (a caller with older decisions) is forwarded, once, with its
original bytes.

Before a batch reaches the table, ``screen`` refuses what breaks the hints, whoever sent it
(``actors/control/checks.py``): such an op changes nothing, and is counted.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any, Awaitable, Callable

from ...bus import envelope as env
from ...state import keys as state_keys
from ...bus.errors import MalformedMessage
from ..control import Migrate, Op, Priority, Refusals, Scale, Weights
from ..control import checks
from ..resources import add, no_room
from ..runtime import Runtime
from .calls import ActorGroup, Book, Bound, Call, Instance, StateGate
from .execute import Executor
from .queues import Scheduler
from .resources import Capacity, ask_of

log = logging.getLogger("nalar.control")


class Enforcer:
    """Carries out decision batches on this node: routing, priorities, migration, instance counts."""

    def __init__(self, book: Book, rt: Runtime, scheduler: Scheduler, executor: Executor,
                 serve: Callable[[ActorGroup], Awaitable[None]],
                 unserve: Callable[[ActorGroup], Awaitable[None]]) -> None:
        self.book = book
        self.rt = rt
        self.table = rt.table
        self.scheduler = scheduler
        self.executor = executor
        self.hosting = executor.hosting
        self.state: StateGate | None = None
        self._serve = serve
        self._unserve = unserve
        self.counts = {"batches": 0, "migrated": 0, "provisioned": 0, "metrics_sent": 0}
        self.homes = os.environ.get("NALAR_SESSION_HOMES", "on").strip().lower() not in ("off", "0", "false", "no")
        self.errors: dict[str, str] = {}
        self.refusals = Refusals()
        self.capacity = Capacity({})  # the node's (``Node`` sets it): what instances may hold here
        rt.screen = self.screen

    # -- where a call belongs ---------------------------------------------------------------------
    def elsewhere(self, g: ActorGroup, c: Call, direct: bool, bound: Bound | None) -> str | None:
        """The node this call belongs on, if the decisions in force say it is not this one.

        ``bound`` is the routing lookup already made for the call (the scheduler reuses it).
        """
        t = self.table
        if c.meta.session is not None and bound is not None:
            iid, hard = bound
            if iid is not None:
                node = t.instances.get(iid)
                if node is not None and node != self.book.name and (hard or not direct) and self.rt.alive(node):
                    return node
                return None
        if not direct:  # from the queue group: does the policy still send this actor's work here?
            w = t.weights.get(g.name)
            if w and not any(w.get(i.id, 0.0) > 0 for i in g.instances if not i.draining):
                node = t.node_for(g.name, None)
                if node is not None and node != self.book.name and self.rt.alive(node):
                    return node
        return None

    def home(self, actor: str, session: str) -> str | None:
        """The node a stateful session's calls go to when no decision routes them: locality, not safety.

        Rendezvous hashing over the live nodes serving ``actor`` (from their heartbeats), so every node
        picks the same one and a node that joins or leaves moves only its share of sessions. Any node
        could serve the session correctly (its state is in the log); sending its calls to one keeps
        that node's copy current, so its calls rarely run twice. ``NALAR_SESSION_HOMES=off`` turns it
        off (calls then run wherever the queue group delivers them).
        """
        if not self.homes:
            return None
        nodes = self.rt.serving(actor)
        if len(nodes) < 2:
            return None
        key = session.encode()
        return max(nodes, key=lambda n: hashlib.blake2b(key + b"\0" + n.encode(), digest_size=8).digest())

    def forward(self, c: Call, node: str | None) -> bool:
        """Send ``c`` on to ``node`` (``None``: any node serving its actor), its bytes unchanged.

        The caller is not involved: the new node answers its reply subject. False if it cannot go
        (it would no longer fit the server's payload limit with the forwarding header).
        """
        headers = c.meta.to_headers()
        headers[env.H_FWD] = self.book.name  # a call is forwarded at most once
        data = c.data
        if data is None:  # it ran once here (a commit lost a race): its arguments are encoded again
            try:
                data = env.encode_call(c.method, c.args, c.kwargs)
            except (TypeError, ValueError):
                return False
        if not env.fits(data, headers, self.rt.transport.max_payload):
            return False
        g = c.group
        subject = self.rt.subjects.call(g.name) if node is None else self.rt.subjects.call_at(g.name, node)
        self.rt.send(subject, data, headers, c.reply)
        self.book.counters["forwarded"] += 1
        return True

    def hand_over(self, c: Call, node: str | None) -> bool:
        """Forward a call accepted here that has not started; this node is then finished with it."""
        if not self.forward(c, node):
            return False
        self.executor.forget(c, node or "*")
        return True

    # -- checking decisions on arrival ----------------------------------------------------------
    def screen(self, msg: dict[str, Any], stored: bool = False) -> dict[str, Any] | None:
        """The batch minus the ops this node refuses, or ``None`` if it is refused whole (a version jump,
        or nothing left once they are out).

        ``stored``: the snapshot in the KV bucket, which a node that fell far behind catches up from
        (so its version may jump), is checked op by op only."""
        why = None if stored else checks.version_jump(self.table.version, msg.get("v"))
        if why is not None:
            self.refusals.add(checks.VERSION_JUMP, "version", why)
            return None
        raw = msg.get("ops")
        if not isinstance(raw, list):
            return msg  # the table refuses it as malformed
        out: list[Any] | None = None
        room = self.capacity.free()  # what is free once the batch's earlier scales here apply
        for k, r in enumerate(raw):
            if not (isinstance(r, list) and len(r) == 5 and r[0] == "scale" and r[1] == self.book.name):
                continue
            try:
                op = Scale.from_wire(r)
            except MalformedMessage:
                continue  # the table refuses the whole batch
            bad = self._scale_refusal(op, msg, raw) or self._room_refusal(op, room)
            if bad is not None:
                self.refusals.add(bad[0], f"scale {op.actor}", bad[1])
                if out is None:
                    out = list(raw[:k])
            elif out is not None:
                out.append(r)
        if out is None:
            return msg
        return dict(msg, ops=out) if out else None  # nothing left: no change at all, not even the version

    def _scale_refusal(self, op: Scale, msg: dict[str, Any], raw: list[Any]) -> tuple[str, str] | None:
        g = self.book.groups.get(op.actor)
        if op.count is None or g is None:  # not hosted here: ``reconcile`` says so
            return None
        t = self.table
        return checks.scale_refusal(
            op.actor, op.node, op.count, len(g.live()) + g.provisioning, g.hints.min_instances,
            g.hints.max_instances, lambda: checks.placed_elsewhere(
                op.actor, self.book.name, raw, msg.get("full") is True, t.scale, t.instances, self.rt.alive))

    def _room_refusal(self, op: Scale, room: dict[str, float]) -> tuple[str, str] | None:
        """A scale that would start instances this node has no room for; else what it leaves in ``room``."""
        g = self.book.groups.get(op.actor)
        ask = {} if g is None else ask_of(g.name, g.hints)
        if op.count is None or g is None or not ask:
            return None
        more = op.count - (len(g.live()) + g.provisioning)
        if more <= 0:  # the instances it drains free what they hold
            add(room, ask, float(min(-more, len(g.live()))))
            return None
        why = no_room(ask, room, self.capacity.total, more)
        if why is not None:
            return checks.NO_ROOM, f"scale {op.actor} on {op.node} to {op.count}: no room: {why}"
        add(room, ask, -float(more))
        return None

    # -- applying decisions ----------------------------------------------------------------------
    def on_decisions(self, ops: list[Op], reply: str) -> None:
        """A batch was applied to the table: carry out what it asks of this node, then say so."""
        prio: set[str] = set()
        weights: set[str] = set()
        scale: set[str] = set()
        migrations: list[Migrate] = []
        for op in ops:
            if isinstance(op, Priority):
                prio.add(op.session)
            elif isinstance(op, Weights):
                weights.add(op.actor)
            elif isinstance(op, Migrate):
                migrations.append(op)
            elif isinstance(op, Scale) and op.node == self.book.name:
                scale.add(op.actor)
        for actor in weights:
            g = self.book.groups.get(actor)
            if g is not None:
                self.scheduler.set_weights(g)
        if prio:
            self.scheduler.reprioritise(prio)
        for m in migrations:
            try:
                self.migrate(m)
            except Exception as e:  # one bad migration must not stop the batch
                log.exception("migration %s failed", m.id)
                self.errors[f"migrate {m.id}"] = repr(e)
        for actor in sorted(scale, key=self._grows):  # shrinks first: growths were checked against their room
            self.reconcile(actor)
        if ops:
            self.counts["batches"] += 1
        if reply:
            self.rt.send(reply, env.dumps({"node": self.book.name, "v": self.table.version}))

    def _grows(self, actor: str) -> bool:
        want, g = self.table.scale.get(self.book.name, {}).get(actor), self.book.groups.get(actor)
        return want is None or g is None or want[0] > len(g.live()) + g.provisioning

    def on_snapshot_request(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """A client asks for the decisions in force (it has no JetStream reads): this node's table, in full,
        with the term it follows; the client checks it as it would the stored snapshot."""
        if not reply:
            return
        t = self.table
        body = {"v": t.version, "term": self.rt.terms.term, "ops": [op.to_wire() for op in t.snapshot_ops()]}
        self.rt.send(reply, env.encode_result(body))

    def migrate(self, op: Migrate) -> None:
        """``migrate(session, src, dst)``: queued calls go to ``dst`` (its route is already set)."""
        g = self.book.groups.get(op.actor)
        if g is None:
            return
        t = self.table
        dst_node = t.instances.get(op.dst)
        src_node = t.instances.get(op.src)
        if dst_node is None:
            self.errors[f"migrate {op.id}"] = f"destination instance {op.dst!r} is unknown"
            return
        unit = None
        if g.hints.stateful and self.state is not None:
            try:
                unit = state_keys.unit(op.session, op.actor)
            except ValueError:
                return
        sched = self.scheduler
        if dst_node == self.book.name:  # bind its queued calls here to dst; fetch its state if it is elsewhere
            for c in sched.session_calls(g, op.session):
                sched.unqueue(c)
                sched.enqueue(c)
            if unit is not None and src_node is not None and src_node != self.book.name:
                asyncio.get_running_loop().create_task(self._prefetch(unit, src_node))
            return
        calls: list[Call] = []
        if unit is not None:
            assert self.state is not None
            calls = self.state.withdraw(unit)
        seen = {id(c) for c in calls}
        calls.extend(c for c in sched.session_calls(g, op.session) if id(c) not in seen)
        moved = 0
        for c in calls:
            sched.unqueue(c)
            if self.hand_over(c, dst_node):
                moved += 1
            elif unit is not None:
                assert self.state is not None
                self.state.admit(c)
            else:
                sched.enqueue(c)
        self.counts["migrated"] += moved

    async def _prefetch(self, unit: bytes, src: str) -> None:
        """Catch a migrating session's state up before its calls arrive (they would wait for it if not)."""
        assert self.state is not None
        try:
            await self.state.bring_here(unit)
        except Exception as e:  # the log is unreachable for now: its first call catches up instead
            log.debug("prefetch of %s (from %s): %r", state_keys.split_unit(unit), src, e)

    # -- provision and kill ----------------------------------------------------------------------
    def reconcile(self, actor: str) -> None:
        """Start or drain instances of ``actor`` until this node has the count the policy wants.

        Instances still starting count as there; if fewer are wanted than run once they are up, the
        excess (those the policy named first) drains then (``provision`` reconciles again).
        """
        want = self.table.scale.get(self.book.name, {}).get(actor)
        if want is None:
            return
        g = self.book.groups.get(actor)
        if g is None:
            self.errors[f"scale {actor}"] = f"node {self.book.name} does not host {actor!r}"
            return
        count, drain = want
        cap = g.hints.max_instances
        if (cap is not None and count > cap) or (cap is None and count > checks.max_instances_per_node()):
            bad = checks.scale_refusal(actor, self.book.name, count, count, 0, cap, lambda: 0)
            if bad is not None:  # (``screen`` keeps such counts out of the table: hints changed since)
                self.refusals.add(bad[0], f"scale {actor}", bad[1])
            return
        live = g.live()
        have = len(live) + g.provisioning
        if count > have:
            ask = ask_of(g.name, g.hints)
            for _ in range(count - have):
                why = self.capacity.lack(ask)
                if why is not None:  # (``screen`` keeps such counts out of the table: room taken since)
                    self.refusals.add(checks.NO_ROOM, f"scale {actor}",
                                      f"provision {actor} on {self.book.name}: no room: {why}")
                    break
                g.provisioning += 1
                asyncio.get_running_loop().create_task(self.provision(g, self.capacity.reserve(ask)))
        elif count < len(live):
            order = sorted(live, key=lambda i: (i.id not in drain, i.running + i.queued, -live.index(i)))
            for inst in order[:len(live) - count]:
                self.kill(inst)

    async def provision(self, g: ActorGroup, held: str = "") -> None:
        """Start one instance of ``g`` on the room ``held`` reserved for it (released if it fails)."""
        try:
            inst = self.hosting.new(g)
            await self.hosting.start(inst)
        except Exception as e:
            log.exception("provisioning an instance of %s failed", g.name)
            self.errors[f"provision {g.name}"] = repr(e)
            self.capacity.release(held)
            return
        finally:
            g.provisioning -= 1
        self.capacity.rename(held, inst.id)
        w = self.table.weights.get(g.name)
        if w is not None:
            inst.weight = w.get(inst.id, 0.0)
        self.hosting.add(inst)
        self.counts["provisioned"] += 1
        await self._serve(g)
        self.scheduler.pump(inst)
        self.reconcile(g.name)  # fewer may be wanted by now (a kill decided while it was starting)

    def kill(self, inst: Instance) -> None:
        """Stop giving ``inst`` calls; its queued calls go to the others; it stops when idle."""
        g = inst.group
        inst.draining = True
        self.capacity.release(inst.id)  # free for what the policy places next; its running calls finish
        self.scheduler.requeue_shared(inst)
        if inst.running == 0:
            self.hosting.retire(inst)
        if g.live():
            self.scheduler.pump_all(g)
        else:  # none left here: stop taking its calls, pass the queued ones to other nodes
            asyncio.get_running_loop().create_task(self._hand_off_group(g))

    async def _hand_off_group(self, g: ActorGroup) -> None:
        await self._unserve(g)
        for c in self.scheduler.shared_calls(g):
            if g.live():
                break  # provisioned again meanwhile
            self.scheduler.unqueue(c)
            if not self.hand_over(c, None):
                self.scheduler.push(c, None)

    def status(self) -> dict[str, Any]:
        sched = self.book
        refused = dict(self.refusals.counts)
        reasons = dict(self.refusals.reasons)
        for kind in ("stale_term", "forged_term"):  # counted by the runtime's TermGate
            if self.rt.counters.get(kind):
                refused[kind] = self.rt.counters[kind]
        if self.rt.terms.last_refused:
            reasons["term"] = self.rt.terms.last_refused
        return dict(self.counts, killed=self.hosting.retired, applied_version=self.table.version,
                    schedule_us=round(sched.sched_ns / sched.sched_calls / 1000, 3) if sched.sched_calls else None,
                    errors=dict(self.errors), term=self.rt.terms.term, refused=refused, refusals=reasons)
