"""The built-in policies, each a short class over the primitives (see ``api.py``).

=================  ===========================================================================
name               what it does
=================  ===========================================================================
``balance``        weights each actor's unrouted calls by the free capacity of its instances
``head-of-line``   moves sessions queued behind a backlog to idle instances (state follows)
``reassign``       on a node, drains an instance of an idle actor and starts one of a hot actor
``srtf``           later workflow stages first (shortest remaining time first, approximately)
``lpt``            re-entering jobs (sessions with failed calls, retries) first
``affinity``       a model's session waits for the instance holding its cache; new sessions go to the
                   least-loaded instance; a session moves when it waits long while another has room
``sticky``         the baseline: sessions pinned to an instance by hash, others round-robin, FCFS
``proportional``   shares a node's model slots between model actors in proportion to their demand
``plas``           program-level scheduling: the least-served program first (Autellix's PLAS/ATLAS),
                   with an anti-starvation bound
=================  ===========================================================================
"""
from __future__ import annotations

from .api import Actions, ActorView, InstanceView, Policy, View


class LoadBalance(Policy):
    """Share each actor's unrouted calls in proportion to its instances' free capacity."""

    name = "balance"

    def decide(self, view: View, act: Actions) -> None:
        for actor in view.actors.values():
            live = actor.live()
            if len(live) < 2:
                continue
            loads = [(i.running + i.queued) / (i.limit or 64) for i in live]
            weights = [round(1.0 / (1.0 + 4 * x), 1) or 0.1 for x in loads]  # coarse: few changes to send
            act.weights(actor.name, [i.id for i in live], weights)


class HeadOfLine(Policy):
    """Sessions waiting behind a backlog move to instances that sit idle, their state with them."""

    name = "head-of-line"

    def __init__(self, min_wait_ms: float = 100.0, cooldown_rounds: int = 3) -> None:
        self.min_wait_ms = min_wait_ms
        self.cooldown = cooldown_rounds
        self._moved: dict[str, int] = {}  # session -> round it last moved

    def decide(self, view: View, act: Actions) -> None:
        self._moved = {s: r for s, r in self._moved.items() if view.round - r < self.cooldown}
        for actor in view.actors.values():
            idle = [i for i in actor.live() if i.idle]
            slots = {i.id: i.free for i in idle}
            for w in actor.waiting:
                if not idle:
                    break
                if w.wait_ms < self.min_wait_ms or w.session in self._moved or w.instance not in view.instances:
                    continue  # (no instance left where it waits: that node passes its queue on itself)
                dst = next((i for i in idle if i.node != w.node or i.id != w.instance), None)
                if dst is None:
                    break
                act.migrate(w.session, w.instance, dst.id, soft=actor.kind == "model")  # a cache, not state
                self._moved[w.session] = view.round
                slots[dst.id] -= 1
                if slots[dst.id] <= 0:
                    idle.remove(dst)


class Reassign(Policy):
    """Resources go from cold actors to hot ones: on a node hosting both, drain one, start the other.

    Only where the hot actor's instance fits once the cold one's resources are released (its
    ``resources`` hint against what the node has free); a node where it does not is passed over."""

    name = "reassign"

    def __init__(self, hot_wait_ms: float = 200.0, cooldown_rounds: int = 5) -> None:
        self.hot_wait_ms = hot_wait_ms
        self.cooldown = cooldown_rounds
        self._last: dict[str, int] = {}  # actor -> round it last changed

    def decide(self, view: View, act: Actions) -> None:
        ready = [a for a in view.actors.values() if view.round - self._last.get(a.name, -10**9) >= self.cooldown]
        hot = sorted((a for a in ready if a.queued and a.wait_ms >= self.hot_wait_ms), key=lambda a: -a.queued)
        cold = [a for a in ready if a.queued == 0 and a.running == 0]
        for h in hot:
            for c in cold:
                victim = next((i for i in c.live() if i.idle and h.name in (view.metrics[i.node].get("actors") or {})
                               and act.can_kill(i.id) and act.can_provision(h.name, i.node, freeing=i.id)), None)
                if victim is not None:  # both halves, or neither
                    act.kill(victim.id)
                    act.provision(h.name, victim.node)
                    self._last[h.name] = self._last[c.name] = view.round
                    cold.remove(c)
                    break


class _Expiring(Policy):
    """Priorities it set are cleared once their session has not been seen waiting for a while."""

    def __init__(self, keep_rounds: int = 30) -> None:
        self.keep = keep_rounds
        self._seen: dict[str, int] = {}

    def _mark(self, view: View, session: str) -> None:
        self._seen[session] = view.round

    def _expire(self, view: View, act: Actions) -> None:
        for s, r in list(self._seen.items()):
            if view.round - r >= self.keep:
                del self._seen[s]
                act.set_priority(s, None)


class SRTF(_Expiring):
    """Later workflow stages first: a call its request made late has less work left behind it."""

    name = "srtf"

    def decide(self, view: View, act: Actions) -> None:
        for actor in view.actors.values():
            for w in actor.waiting:
                if w.stage > 0 and w.reentries == 0:
                    act.set_priority(w.session, w.stage)
                    self._mark(view, w.session)
        self._expire(view, act)


class LPT(_Expiring):
    """Re-entering jobs first: a session whose calls failed has been waiting longest in total."""

    name = "lpt"
    BOOST = 1000

    def decide(self, view: View, act: Actions) -> None:
        for actor in view.actors.values():
            for w in actor.waiting:
                if w.reentries > 0:
                    act.set_priority(w.session, self.BOOST + w.reentries)
                    self._mark(view, w.session)
        self._expire(view, act)


class CacheAffinity(Policy):
    """A model's sessions meet their prefix cache, and new sessions go where there is room.

    A session stays with the instance that last served it (``affinity``: its KV cache holds the
    conversation so far), so only a new session is free to go anywhere, and where it goes decides the
    instance's load for the rest of its life. New sessions therefore go to the least-loaded instance
    (``home``, re-chosen every round from running + queued calls; callers hash over it alone, so a
    session's first, concurrent calls meet in one cache), not to a fixed hash that piles sessions
    up on one instance by chance. Every session served is pinned where it was served, so a change of
    ``home`` moves nobody. A session whose calls have waited ``move_after_ms`` behind a backlog while
    another instance has room and nobody waiting moves there (``migrate``, softly): a safety valve for
    a slow or lost instance, set high because each move costs a cache miss."""

    name = "affinity"

    def __init__(self, keep_rounds: int = 1200, move_after_ms: float = 5000.0, cooldown_rounds: int = 8,
                 max_sessions: int = 10_000) -> None:
        self.keep = keep_rounds
        self.max_sessions = max_sessions  # pinned at once: the snapshot must fit one NATS message
        self.move_after_ms = move_after_ms
        self.cooldown = cooldown_rounds
        self._seen: dict[tuple[str, str], int] = {}  # (session, actor) -> round its affinity was last set
        self._moved: dict[str, int] = {}  # session -> round it last moved

    def decide(self, view: View, act: Actions) -> None:
        self._moved = {s: r for s, r in self._moved.items() if view.round - r < self.cooldown}
        for actor in view.actors.values():
            if actor.kind != "model":
                continue
            live = actor.live()
            if not live:
                continue
            act.home(actor.name, [self._lightest(live, view.table.home.get(actor.name))])
            for session, inst in actor.recent:
                if inst in view.instances:
                    act.affinity(session, actor.name, inst)
                    self._pin(session, actor.name, view.round)
            self._rebalance(view, act, actor)
        for (s, a), r in list(self._seen.items()):
            if view.round - r < self.keep and len(self._seen) <= self.max_sessions:
                break  # oldest first: the rest are newer
            del self._seen[(s, a)]
            act.affinity(s, a, None)

    def _pin(self, session: str, actor: str, round_no: int) -> None:
        """Note when the session's affinity was set, newest last (so expiry reads oldest first)."""
        self._seen.pop((session, actor), None)
        self._seen[(session, actor)] = round_no

    @staticmethod
    def _lightest(live: list[InstanceView], current: list[str] | None) -> str:
        """The instance with the fewest calls running and waiting; the current home on a tie (fewer
        table changes)."""
        load = {i.id: i.running + i.queued for i in live}
        least = min(load.values())
        if current and len(current) == 1 and load.get(current[0]) == least:
            return current[0]
        return min(i for i, n in load.items() if n == least)

    def _rebalance(self, view: View, act: Actions, actor: ActorView) -> None:
        room = {i.id: i.free for i in actor.live() if i.queued == 0 and i.free > 0}
        if not room:
            return
        calls: dict[tuple[str, str], int] = {}
        for w in actor.waiting:
            if w.routed:
                calls[(w.session, w.instance)] = calls.get((w.session, w.instance), 0) + 1
        for w in actor.waiting:  # longest wait first
            if not room:
                break
            if not w.routed or w.wait_ms < self.move_after_ms or w.session in self._moved:
                continue
            dst = max(room, key=lambda i: (room[i], i))
            if dst == w.instance:
                continue
            act.migrate(w.session, w.instance, dst, soft=True)
            self._moved[w.session] = view.round
            self._pin(w.session, actor.name, view.round)
            room[dst] -= calls.get((w.session, w.instance), 1)
            if room[dst] <= 0:
                del room[dst]


class Proportional(Policy):
    """Model slots (GPUs) follow demand: the model actors of a deployment share their instances in
    proportion to the calls each has in the system (running + queued), each keeping ``min_instances``
    (at least 1). One slot moves per round at most, drained first, then started for the hungrier model
    on the same node; a moved actor waits ``cooldown_rounds`` before it moves again."""

    name = "proportional"

    def __init__(self, cooldown_rounds: int = 5, min_demand: int = 4) -> None:
        self.cooldown = cooldown_rounds
        self.min_demand = min_demand
        self._last: dict[str, int] = {}

    def decide(self, view: View, act: Actions) -> None:
        models = [a for a in view.actors.values() if a.kind == "model"]
        demand = {a.name: a.running + a.queued for a in models}
        total = sum(demand.values())
        if len(models) < 2 or total < self.min_demand:
            return
        slots = sum(len(a.live()) for a in models)
        want = {a.name: max(1, a.min_instances, round(slots * demand[a.name] / total)) for a in models}
        have = {a.name: len(a.live()) for a in models}
        ready = [a for a in models if view.round - self._last.get(a.name, -10**9) >= self.cooldown]
        hungry = sorted((a for a in ready if have[a.name] < want[a.name]),
                        key=lambda a: have[a.name] - want[a.name])
        spare = sorted((a for a in ready if have[a.name] > want[a.name]), key=lambda a: want[a.name] - have[a.name])
        for h in hungry:
            for c in spare:
                victims = sorted((i for i in c.live() if h.name in (view.metrics[i.node].get("actors") or {})),
                                 key=lambda i: i.running + i.queued)
                for v in victims:
                    if act.can_kill(v.id) and act.can_provision(h.name, v.node, freeing=v.id):
                        act.kill(v.id)
                        act.provision(h.name, v.node)
                        self._last[h.name] = self._last[c.name] = view.round
                        return


class Sticky(Policy):
    """The baseline's binding, for comparisons: what agent frameworks without a global scheduler do.

    Every actor's sessions are pinned to one instance by a hash of the session id (first GPU, forever:
    no migration), other calls go round-robin, each bound on arrival to its instance's FIFO queue and
    handed to it as soon as a slot is free, with no admission budget (a model's engine gets every call
    at once, as from a framework calling a vLLM server). Run it alone: with no priority policy, queues
    are first come, first served."""

    name = "sticky"

    def decide(self, view: View, act: Actions) -> None:
        for actor in view.actors.values():
            live = sorted(i.id for i in actor.live())
            if live:
                act.sticky(actor.name, live)


class PLAS(Policy):
    """Program-level attained service: each actor's queue serves first the calls of the programs that
    have received the least service so far, measured along the critical path of their calls (so a
    program that fans out counts its longest branch, as ATLAS does), among calls of one priority.

    Short programs then overtake long ones (at a shared model pool, a router's chat turn is not stuck
    behind a coding agent's fifth call), and a program's later calls do not queue behind every new
    program's first one forever: a call is ordered as if its request had started ``weight`` times its
    program's service later, never more than ``bound`` seconds later. It composes with the policies
    that set priorities (``srtf``, ``lpt``): they decide first, it orders within a priority."""

    name = "plas"

    def __init__(self, weight: float = 1.0, bound: float = 30.0, actor: str = "*") -> None:
        self.weight = weight
        self.bound = bound
        self.actor = actor

    def decide(self, view: View, act: Actions) -> None:
        act.order(self.actor, self.weight, self.bound)  # (an op the table already holds is dropped)


BUILTIN: dict[str, type[Policy]] = {p.name: p for p in (LoadBalance, HeadOfLine, Reassign, SRTF, LPT, CacheAffinity,
                                                       Proportional, Sticky, PLAS)}
DEFAULT = ("balance", "head-of-line", "affinity")
