"""What ``nalar top`` shows, gathered: the status requests ``nalar status`` makes, kept across rounds.

A round asks every node and the policy actor at once, as the operator. The answers are turned into one
``Frame`` of plain rows, so the screen (``cli/top.py``) only lays them out. The model outlives a
round: a node that stops answering stays on screen as stale, then missing, with the time it was last
heard from (its heartbeat, which the client runtime tracks), instead of silently vanishing; and when
nothing answers at all, the last frame is kept and ``silent_s`` says for how long.

Fields a node may not report yet (``latency_ms``, ``wait_ms``, ``waiting`` per actor) read as ``None``:
the screen shows a dash for them rather than a made-up zero.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..actors.client import Client
from ..actors.retry import LIVENESS_TIMEOUT

#: A node not heard from for this long is no longer "stale" but "missing" (it stays listed).
MISSING_AFTER = 30.0
#: ... and one not heard from for this long is dropped (node names of restarted processes pile up).
FORGET_AFTER = 300.0
#: Seconds a connection warning stays on screen.
NOTE_SHOWN = 30.0
#: Sessions listed under "waiting longest".
WAITING_SHOWN = 5


@dataclass
class NodeRow:
    name: str
    health: str  # "up", "stale" (no heartbeat or no answer lately) or "missing"
    uptime_s: float | None
    in_flight: int | None
    seen_s: float | None  # seconds since its last heartbeat or answer
    decisions_v: int | None  # the decision version it has applied
    term: int | None  # the policy term it follows
    refused: int  # decisions it refused (stale or forged term, bad ops)


@dataclass
class InstanceRow:
    id: str
    queued: int
    running: int
    limit: int | None
    handled: int
    draining: bool


@dataclass
class ActorRow:
    actor: str
    node: str
    kind: str
    queued: int
    running: int
    done: int
    failed: int
    p50_ms: float | None  # run time over the node's recent window
    p99_ms: float | None
    wait_ms: float | None  # median queue wait over that window
    instances: list[InstanceRow] = field(default_factory=list)
    stale: bool = False  # its node did not answer this round: these are its last numbers


@dataclass
class WaitingRow:
    session: str
    actor: str
    node: str
    wait_ms: float


@dataclass
class EngineRow:
    instance: str
    kv_usage: float | None
    running: int | None
    waiting: int | None
    prefix_hit_rate: float | None
    simulated: str | None
    error: str | None


@dataclass
class Leader:
    name: str | None
    role: str  # "leader", "standby" (no leader answered) or "single" (no election)
    term: int
    policies: list[str]
    interval_s: float | None
    rounds: int
    last_round_ms: float | None
    errors: dict[str, str]
    refused: list[str]
    standbys: list[str]


@dataclass
class Frame:
    """One screen's worth: everything already in display order."""

    url: str
    namespace: str
    at: float  # wall-clock time of the round
    nodes: list[NodeRow]
    actors: list[ActorRow]
    waiting: list[WaitingRow] | None  # None: no node reports who waits
    engines: list[EngineRow]
    decisions_v: int | None
    decisions: list[str]
    leader: Leader | None
    silent_s: float | None  # nothing answered this round: for how long nothing has
    note: str = ""  # the last connection warning, or why a round failed


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _dict(v: Any) -> dict[str, Any]:
    """``v`` if it is an object, else empty: a status is any JSON a node (or a forger) sent."""
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _pct(d: Any, key: str) -> float | None:
    """``p50``/``p99`` of a ``{"p50", "p99", "n", "window_s"}`` dict, if the node reports one."""
    return _num(d.get(key)) if isinstance(d, dict) else None


def decision_lines(d: dict[str, Any]) -> list[str]:
    """The decisions in force, one short line each (``nalar status`` shows the same, wordier)."""
    out: list[str] = []
    for actor, w in sorted(_dict(d.get("weights")).items()):
        out.append(f"weights {actor}: " + ", ".join(f"{i} x{_num(x) or 0:g}" for i, x in sorted(_dict(w).items())))
    for kind in ("sticky", "home"):
        for actor, insts in sorted(_dict(d.get(kind)).items()):
            n = len(insts) if isinstance(insts, (list, dict)) else 0
            out.append(f"{kind} {actor}: {n} instance{'s' if n != 1 else ''}")
    for actor, o in sorted(_dict(d.get("order")).items()):
        o = _dict(o)
        out.append(f"order {actor}: least-served first, x{_num(o.get('weight')) or 0:g} <= {_num(o.get('bound_s')) or 0:g} s")
    for kind, word in (("session_routes", "routes"), ("affinity_routes", "affinity")):
        for actor, v in sorted(_dict(d.get(kind)).items()):
            k = _int(v) or 0
            out.append(f"{word} {actor}: {k} session{'s' if k != 1 else ''}")
    prios = _int(d.get("priorities"))
    if prios:
        out.append(f"priorities: {prios} session{'s' if prios != 1 else ''}")
    for node, per in sorted(_dict(d.get("scale")).items()):
        out.append(f"want on {node}: " + ", ".join(f"{a} x{_int(c) if _int(c) is not None else c!r:.20}"
                                                   for a, c in sorted(_dict(per).items())))
    return out


def _leader(p: dict[str, Any]) -> Leader:
    last = _dict(p.get("last_round"))
    leader = p.get("leader")
    return Leader(
        name=str(leader) if leader is not None else None,
        role=str(p.get("role", "single")), term=_int(p.get("term")) or 0,
        policies=[str(x) for x in _list(p.get("policies"))], interval_s=_num(p.get("interval_s")),
        rounds=_int(p.get("rounds")) or 0, last_round_ms=_num(last.get("round_ms")),
        errors={str(k): str(v) for k, v in _dict(p.get("errors")).items()},
        refused=[str(r) for r in _list(p.get("refused"))], standbys=[str(s) for s in _list(p.get("standbys"))])


class Watch:
    """Rounds of status requests over one client; remembers nodes between rounds."""

    def __init__(self, client: Client, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.last_seen: dict[str, float] = {}  # node -> monotonic time it last answered
        self.known: dict[str, dict[str, Any]] = {}  # node -> its last status
        self.answered: float | None = None  # monotonic time anything last answered
        self.started = time.monotonic()
        self.note = ""  # the last connection warning (cli/top.py catches the log lines)
        self.noted = 0.0  # monotonic time of it
        self.last: Frame | None = None

    async def round(self, timeout: float) -> Frame:
        """Ask everyone once (waiting at most ``timeout``) and make the frame."""
        note = ""
        try:
            nodes, policy = await asyncio.gather(self.client.status_async(timeout),
                                                 self.client.policy_status_async(min(timeout, 1.0)))
        except Exception as e:  # a refused or broken connection: shown, and the next round tries again
            nodes, policy, note = [], None, f"{type(e).__name__}: {e}"
        now = time.monotonic()
        nodes = [st for st in nodes if _readable(st)]  # one forged or broken status is left out, not a crash
        if policy is not None and not _readable_policy(policy):
            policy = None
        for st in nodes:
            name = str(st.get("node"))
            self.known[name] = st
            self.last_seen[name] = now
        if nodes or policy is not None:
            self.answered = now
        frame = self._frame(nodes, policy, now)
        frame.note = note or (self.note if now - self.noted < NOTE_SHOWN else "")
        if frame.silent_s is not None and self.last is not None:  # the decisions last seen, marked so
            frame.decisions_v, frame.decisions, frame.leader = self.last.decisions_v, self.last.decisions, None
        else:
            self.last = frame
        return frame

    def _seen_s(self, name: str, now: float) -> float | None:
        """Seconds since ``name``'s last heartbeat or status answer, whichever is later."""
        times = [self.last_seen.get(name)]
        hb = self.client.runtime.node_seen.get(name)
        if hb is not None:
            times.append(hb[0])
        got = [t for t in times if t is not None]
        return max(now - max(got), 0.0) if got else None

    def _frame(self, nodes: list[dict[str, Any]], policy: dict[str, Any] | None, now: float) -> Frame:
        answering = {str(st.get("node")) for st in nodes}
        names = sorted(set(self.known) | set(self.client.runtime.node_seen))
        rows: list[NodeRow] = []
        for name in names:
            st = self.known.get(name, {})
            seen = self._seen_s(name, now)
            if seen is not None and seen > FORGET_AFTER:
                self.known.pop(name, None)
                continue
            fresh = name in answering and seen is not None and seen < LIVENESS_TIMEOUT
            health = "up" if fresh else "missing" if seen is None or seen > MISSING_AFTER else "stale"
            ctl = _dict(st.get("control"))
            rows.append(NodeRow(name, health, _num(st.get("uptime_s")) if name in answering else None,
                                _int(st.get("in_flight")) if name in answering else None, seen,
                                _int(ctl.get("applied_version")), _int(ctl.get("term")),
                                sum(v for v in _dict(ctl.get("refused")).values() if _int(v) is not None)))
        actors: list[ActorRow] = []
        waiting: list[WaitingRow] | None = None
        engines: list[EngineRow] = []
        stale = [self.known[r.name] for r in rows if r.health == "stale" and r.name not in answering]
        for st in sorted(nodes + stale, key=lambda st: str(st.get("node"))):
            node = str(st.get("node"))
            if node not in answering:  # its last numbers, marked; who waits there now is unknown
                actors += [self._actor(name, node, _dict(a), stale=True)
                           for name, a in sorted(_dict(st.get("actors")).items())]
                continue
            for name, a in sorted(_dict(st.get("actors")).items()):
                a = _dict(a)
                actors.append(self._actor(name, node, a))
                if isinstance(a.get("waiting"), list):
                    waiting = waiting if waiting is not None else []
                    waiting += [WaitingRow(str(w.get("session")), name, node, _num(w.get("wait_ms")) or 0.0)
                                for w in a["waiting"] if isinstance(w, dict)]
                for iid, e in sorted(_dict(a.get("engine")).items()):
                    e = _dict(e)
                    engines.append(EngineRow(iid, _num(e.get("kv_usage")), _int(e.get("running")),
                                             _int(e.get("waiting")), _num(e.get("prefix_hit_rate")),
                                             str(e["simulated"]) if e.get("simulated") else None,
                                             str(e["error"]) if "error" in e else None))
        if waiting is not None:
            waiting = sorted(waiting, key=lambda w: -w.wait_ms)[:WAITING_SHOWN]
        table = _dict(policy.get("decisions")) or None if policy is not None else None
        if table is None and nodes:  # no policy actor: the nodes keep the decisions they have
            table = max((_dict(st.get("decisions")) for st in nodes), key=lambda d: _int(d.get("version")) or 0)
        silent = None if self.answered == now else now - (self.answered or self.started)
        return Frame(url=self.client.url, namespace=self.namespace, at=time.time(), nodes=rows, actors=actors,
                     waiting=waiting, engines=engines,
                     decisions_v=_int(table.get("version")) if table else None,
                     decisions=decision_lines(table) if table else [],
                     leader=_leader(policy) if policy is not None else None, silent_s=silent)

    @staticmethod
    def _actor(name: str, node: str, a: dict[str, Any], stale: bool = False) -> ActorRow:
        insts = [InstanceRow(str(i.get("id")), _int(i.get("queued")) or 0, _int(i.get("running")) or 0,
                             _int(i.get("limit")), _int(i.get("handled")) or 0, bool(i.get("draining")))
                 for i in _list(a.get("instances")) if isinstance(i, dict)]
        lat = a.get("latency_ms")
        return ActorRow(name, node, str(a.get("kind", "")), _int(a.get("queued")) or 0, _int(a.get("running")) or 0,
                        _int(a.get("done")) or 0, _int(a.get("failed")) or 0, _pct(lat, "p50"), _pct(lat, "p99"),
                        _pct(a.get("wait_ms"), "p50"), insts, stale)


def _readable(st: Any) -> bool:
    """A node status top can show: an object with a name (every field it reads is type-checked where read)."""
    return isinstance(st, dict) and isinstance(st.get("node"), str) and bool(st["node"])


def _readable_policy(p: Any) -> bool:
    return isinstance(p, dict)
