"""The policy actor: one leader per namespace, one single-threaded periodic loop, off the critical path.

Each round: ask every node for its metrics (scatter/gather on ``nalar.<ns>.metrics``), run the
installed policies over them, and broadcast what they decided as one versioned batch on
``nalar.<ns>.policy``; nodes apply it and say so. The decisions in force are also written, as a full
snapshot, to the JetStream KV bucket ``nalar_<ns>_policy`` *before* the batch goes out, so that:

- a node or client that starts (or missed a batch) takes the snapshot and catches up;
- a policy actor that restarts continues from the snapshot's version, and because decisions are
  state (routes, priorities, desired instance counts), nothing is applied twice;
- while no policy actor runs, every process keeps enforcing the last decisions it has.

Any number may run per namespace: they elect a leader with a lease (``lease.py``), and only the leader
runs rounds; the others are standbys that answer status requests and take over within a few seconds
of the leader's death. A new leader re-reads the snapshot, continues its versions, and announces it in
full. Every batch and the snapshot carry the leader's *term*, so processes refuse a deposed or forged
leader's batches (``actors/control/term.py``). The snapshot is written compare-and-set on the revision
the leader last read or wrote: a write that finds another's in between means it was deposed. Without
JetStream there is no lease: the actor decides alone (role ``single``, term 0).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import statistics
import time
from typing import Any

from nats.errors import Error as NatsError

from ..actors.control import DecisionTable
from ..actors.retry import LIVENESS_TIMEOUT
from ..actors.runtime import Runtime
from ..bus import envelope as env
from ..bus import kv as bkv
from ..bus.errors import BusError, MalformedMessage
from .api import Actions, Policy, View
from .lease import RENEW_EVERY, TRY_EVERY, Lease
from .metrics import RoundTally
from .spans import round_span

log = logging.getLogger("nalar.policy")
DEFAULT_INTERVAL = 1.0
_seq = itertools.count(1)


def default_name() -> str:
    """``HOST-PID`` (a second actor in the same process gets ``-2``, and so on)."""
    n = next(_seq)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{n}" if n > 1 else "")


class _Deposed(Exception):
    """The snapshot changed under this leader: another actor wrote it."""


class PolicyActor:
    def __init__(self, rt: Runtime, policies: list[Policy], interval: float = DEFAULT_INTERVAL,
                 collect_timeout: float = 1.0, name: str | None = None) -> None:
        self.rt = rt
        self.name = name or default_name()
        self.policies = policies
        self.interval = interval
        self.collect_timeout = collect_timeout
        self.table = DecisionTable()
        self.round_no = 0
        self.rounds: list[dict[str, Any]] = []  # the last few rounds' timings
        self.errors: dict[str, str] = {}
        self.refused: list[str] = []
        self.tally = RoundTally()  # for /metrics (policy/metrics.py)
        self._kv: Any = None
        self._snap_rev = 0  # the snapshot's revision this leader last read or wrote (compare-and-set)
        self.lease: Lease | None = None  # None: no JetStream, no election
        self.terms: list[dict[str, Any]] = []  # the terms this actor led: term, since (unix time), v, takeover_ms
        self._lock = asyncio.Lock()  # a round and a takeover never interleave
        self._lease_task: asyncio.Task[None] | None = None
        self._subs: list[Any] = []
        self.started = time.time()

    # -- the lease --------------------------------------------------------------------------------
    @property
    def role(self) -> str:
        if self.lease is None:
            return "single"
        return "leader" if self.lease.held else "standby"

    @property
    def term(self) -> int:
        return self.lease.term if self.lease is not None else 0

    def may_decide(self) -> bool:
        """Leading with a lease renewed recently enough (or alone, without JetStream)."""
        return self.lease is None or self.lease.fresh()

    async def start(self) -> None:
        """Load the decisions in force, answer status requests, and lead if nobody does (then the
        decisions are re-announced in full); else stand by."""
        js = self.rt.transport.jetstream()
        if js is not None:
            self._kv = await bkv.open_bucket(js, bkv.policy_bucket(self.rt.subjects.ns), "policy decisions")
            await self._load()
            self.lease = Lease(js, self.rt.subjects.ns, self.name)
            await self.lease.open()
        self._subs.append(await self.rt.transport.subscribe(self.rt.subjects.policy_status, self._on_status))
        if self.lease is None:
            await self.rt.transport.publish(self.rt.subjects.policy, self._snapshot(full=True))
        else:
            try:
                if await self.lease.try_take():
                    await self._take_over()
            except Exception as e:  # the lease loop tries again
                log.warning("policy actor %s: taking the lease failed: %r", self.name, e)
            self._lease_task = asyncio.get_running_loop().create_task(self._keep_lease())
        await self.rt.transport.flush()

    async def _keep_lease(self) -> None:
        """Renew the lease while leading; while standing by, take it as soon as it is free."""
        assert self.lease is not None
        while not self.rt.closed:
            try:
                if self.lease.held:
                    if not await self.lease.renew():
                        self._stepped_down("another actor took the lease")
                elif await self.lease.try_take():
                    await self._take_over()
            except asyncio.CancelledError:
                raise
            except _Deposed:
                await self._step_down("another actor wrote the decisions")
            except Exception as e:  # the server is unreachable for now: ``may_decide`` stops rounds meanwhile
                log.debug("policy actor %s: lease: %r", self.name, e)
            await asyncio.sleep(RENEW_EVERY if self.lease.held else TRY_EVERY)

    async def _take_over(self) -> None:
        """Now leading: continue from the stored decisions, stamp them with this term, announce them."""
        async with self._lock:
            t0 = time.perf_counter()
            try:
                await self._load()
                await self._persist()
                await self.rt.transport.publish(self.rt.subjects.policy, self._snapshot(full=True))
                await self.rt.transport.flush()
            except Exception:  # half taken over: let go, and take it again from the start later
                assert self.lease is not None
                await self.lease.release()
                raise
            self.terms = (self.terms + [{"term": self.term, "since": time.time(), "v": self.table.version,
                                         "takeover_ms": round((time.perf_counter() - t0) * 1000, 3)}])[-10:]
            self.errors.pop("lease", None)

    async def _step_down(self, why: str) -> None:
        assert self.lease is not None
        await self.lease.release()
        self._stepped_down(why)

    def _stepped_down(self, why: str) -> None:
        log.warning("policy actor %s stands by: %s", self.name, why)
        self.errors["lease"] = f"stepped down: {why}"

    async def _load(self) -> None:
        """The decisions in force, from the snapshot (none stored: none)."""
        got = await bkv.get(self._kv, bkv.POLICY_KEY)
        self._snap_rev = got[1] if got is not None else 0
        if got is None:
            self.table.reset()
            return
        try:
            self.table.apply(dict(env.decode_json_object(got[0], "policy snapshot"), full=True))
        except MalformedMessage as e:
            log.warning("the stored decisions are unreadable (%s); starting from none", e)
            self.table.reset()

    async def _persist(self) -> None:
        """Write the snapshot over the one this leader last read or wrote; ``_Deposed`` if another did."""
        from nats.js.errors import KeyWrongLastSequenceError

        data = self._snapshot()
        try:
            if self._snap_rev:
                self._snap_rev = await self._kv.update(bkv.POLICY_KEY, data, last=self._snap_rev)
            else:
                self._snap_rev = await self._kv.create(bkv.POLICY_KEY, data)
        except KeyWrongLastSequenceError:
            raise _Deposed() from None

    async def stop(self) -> None:
        """Stop renewing and let go of the lease (a standby takes over at once); stop answering."""
        if self._lease_task is not None:
            self._lease_task.cancel()
            try:
                await self._lease_task
            except (asyncio.CancelledError, Exception):
                pass
            self._lease_task = None
        if self.lease is not None:
            await self.lease.release()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception:
                pass

    def _snapshot(self, full: bool = False) -> bytes:
        msg: dict[str, Any] = {"v": self.table.version, "ops": [op.to_wire() for op in self.table.snapshot_ops()],
                               "t": time.time(), "term": self.term}
        if full:
            msg["full"] = True
        return env.dumps(msg)

    def _report(self, where: str, e: Exception, what: str = "control round failed") -> None:
        """Log a failure once as it starts (with its traceback if it is a bug, one line if the bus is
        away), not again every round while it lasts; ``nalar status`` shows it meanwhile."""
        text = repr(e)
        again = self.errors.get(where) == text
        self.errors[where] = text
        if again:
            log.debug("%s again: %s", what, text)
        elif isinstance(e, (asyncio.TimeoutError, ConnectionError, BusError, NatsError)):
            log.warning("%s: %s (the next round tries again)", what, text)
        else:
            log.exception("%s (logged once; `nalar status` shows it while it lasts)", what)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await self.round()
                self.errors.pop("round", None)
            except Exception as e:  # a lost connection, a full KV...: log it, try again next round
                self._report("round", e)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, self.interval - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    async def round(self) -> dict[str, Any]:
        """One full round: gather, decide, persist, broadcast, wait for every node to apply it.

        Only the leader runs rounds; a standby's (or a leader's that could not renew) is skipped."""
        if not self.may_decide():
            return {"round": self.round_no, "role": self.role, "skipped": True}
        async with self._lock:
            try:
                return await self._round()
            except _Deposed:
                await self._step_down("another actor wrote the decisions")
                return {"round": self.round_no, "role": self.role, "skipped": True}

    async def _round(self) -> dict[str, Any]:
        if not self.may_decide():
            return {"round": self.round_no, "role": self.role, "skipped": True}
        t0 = time.perf_counter()
        start_ns = time.time_ns()
        self.round_no += 1
        metrics = await self.collect()
        t1 = time.perf_counter()
        view = View(metrics, self.table, self.round_no)
        act = Actions(view)
        for p in self.policies:
            name = p.name or type(p).__name__
            try:
                p.decide(view, act)
                self.errors.pop(name, None)
            except Exception as e:  # a broken policy is reported, the others still run
                self._report(name, e, f"policy {name} failed")
        ops = [op.to_wire() for op in act.batch()]  # the wire form: applied here, then broadcast
        refused = len(act.refused)
        if act.refused:
            self.refused = (self.refused + act.refused)[-20:]
        t2 = time.perf_counter()
        if not self.may_decide():  # the lease could not be renewed while metrics came in
            return {"round": self.round_no, "role": self.role, "skipped": True}
        prev = self.table.version
        if ops:
            self.table.apply({"v": prev + 1, "prev": prev, "ops": ops})
            if self._kv is not None:
                await self._persist()
        v = self.table.version
        msg = env.dumps({"v": v, "prev": prev if ops else v - 1, "ops": ops, "term": self.term})
        if not self.may_decide():
            return {"round": self.round_no, "role": self.role, "skipped": True}
        acked = await self._broadcast(msg, set(metrics), v)
        t3 = time.perf_counter()
        stats = {"round": self.round_no, "v": v, "term": self.term, "nodes": len(metrics), "applied_by": acked,
                 "futures": view.futures, "ops": len(ops),
                 "collect_ms": round((t1 - t0) * 1000, 3), "policy_ms": round((t2 - t1) * 1000, 3),
                 "broadcast_ms": round((t3 - t2) * 1000, 3), "round_ms": round((t3 - t0) * 1000, 3)}
        self.rounds = (self.rounds + [stats])[-50:]
        round_span(stats, ops, refused, start_ns, self.name)
        self.tally.round(stats["round_ms"], ops, refused)
        return stats

    async def collect(self) -> dict[str, dict[str, Any]]:
        """Every live node's metrics: those heard from within the timeout (all known nodes: sooner)."""
        now = time.monotonic()
        expect = {n for n, (seen, _) in self.rt.node_seen.items() if now - seen < LIVENESS_TIMEOUT}
        got: dict[str, dict[str, Any]] = {}

        def on(data: bytes, headers: dict[str, str] | None) -> bool:
            try:
                m = env.decode_json_object(data, "metrics")
                node = m.get("node")
                if not isinstance(node, str) or not isinstance(m.get("actors"), dict):
                    raise MalformedMessage("metrics must have 'node' and 'actors'")
            except MalformedMessage:
                self.rt.count_malformed("metrics")
                return False
            got[node] = m
            return bool(expect) and expect <= got.keys()

        await self.rt.scatter(self.rt.subjects.metrics, b"{}", on, self.collect_timeout)
        return got

    async def _broadcast(self, msg: bytes, nodes: set[str], v: int) -> int:
        """Publish the batch; wait (bounded) until every node that sent metrics has applied it."""
        acked: set[str] = set()

        def on(data: bytes, headers: dict[str, str] | None) -> bool:
            try:
                body = env.decode_json_object(data, "applied")
            except MalformedMessage:
                return False
            if isinstance(body.get("node"), str) and isinstance(body.get("v"), int) and body["v"] >= v:
                acked.add(body["node"])
                return nodes <= acked
            return False

        # no node to wait for: publish (with the reply subject all the same) and go on
        await self.rt.scatter(self.rt.subjects.policy, msg, on, self.collect_timeout if nodes else 0)
        return len(acked & nodes)

    def status(self) -> dict[str, Any]:
        recent = self.rounds[-20:]
        lease = self.lease
        return {
            "name": self.name, "role": self.role, "term": self.term,
            "leader": self.name if lease is None else (lease.holder or None),
            "leader_term": self.term if lease is None else lease.holder_term, "terms": list(self.terms),
            "policies": [p.name or type(p).__name__ for p in self.policies], "interval_s": self.interval,
            "rounds": self.round_no, "uptime_s": round(time.time() - self.started, 3),
            "last_round": recent[-1] if recent else None,
            "round_ms_median": round(statistics.median(r["round_ms"] for r in recent), 3) if recent else None,
            "decisions": self.table.summary(), "errors": dict(self.errors), "refused": list(self.refused),
        }

    def _on_status(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if reply:
            self.rt.send(reply, env.encode_result(self.status()))
