"""The policy actor: one per deployment, one single-threaded periodic loop, off the critical path.

Each round: ask every node for its metrics (scatter/gather on ``nalar.<ns>.metrics``), run the
installed policies over them, and broadcast what they decided as one versioned batch on
``nalar.<ns>.policy``; nodes apply it and say so. The decisions in force are also written, as a full
snapshot, to the JetStream KV bucket ``nalar_<ns>_policy`` *before* the batch goes out, so that:

- a node or client that starts (or missed a batch) takes the snapshot and catches up;
- a policy actor that restarts continues from the snapshot's version, and because decisions are
  state (routes, priorities, desired instance counts), nothing is applied twice;
- while no policy actor runs, every process keeps enforcing the last decisions it has.

Run one policy actor per namespace.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

from ..actors.control import DecisionTable
from ..actors.retry import LIVENESS_TIMEOUT
from ..actors.runtime import Runtime
from ..bus import envelope as env
from ..bus import kv as bkv
from ..bus.errors import MalformedMessage
from .api import Actions, Policy, View

log = logging.getLogger("nalar.policy")
DEFAULT_INTERVAL = 1.0


class PolicyActor:
    def __init__(self, rt: Runtime, policies: list[Policy], interval: float = DEFAULT_INTERVAL,
                 collect_timeout: float = 1.0) -> None:
        self.rt = rt
        self.policies = policies
        self.interval = interval
        self.collect_timeout = collect_timeout
        self.table = DecisionTable()
        self.round_no = 0
        self.rounds: list[dict[str, Any]] = []  # the last few rounds' timings
        self.errors: dict[str, str] = {}
        self.refused: list[str] = []
        self._kv: Any = None
        self._subs: list[Any] = []
        self.started = time.time()

    async def start(self) -> None:
        """Load the decisions in force, re-announce them in full, and answer status requests."""
        js = self.rt.transport.jetstream()
        if js is not None:
            self._kv = await bkv.open_bucket(js, bkv.policy_bucket(self.rt.subjects.ns), "policy decisions")
            got = await bkv.get(self._kv, bkv.POLICY_KEY)
            if got is not None:
                try:
                    self.table.apply(dict(env.decode_json_object(got[0], "policy snapshot"), full=True))
                except MalformedMessage as e:
                    log.warning("the stored decisions are unreadable (%s); starting from none", e)
        self._subs.append(await self.rt.transport.subscribe(self.rt.subjects.policy_status, self._on_status))
        await self.rt.transport.publish(self.rt.subjects.policy, self._snapshot(full=True))
        await self.rt.transport.flush()

    async def stop(self) -> None:
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception:
                pass

    def _snapshot(self, full: bool = False) -> bytes:
        msg: dict[str, Any] = {"v": self.table.version, "ops": [op.to_wire() for op in self.table.snapshot_ops()],
                               "t": time.time()}
        if full:
            msg["full"] = True
        return env.dumps(msg)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await self.round()
            except Exception as e:  # a lost connection, a full KV...: log it, try again next round
                log.exception("control round failed")
                self.errors["round"] = repr(e)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, self.interval - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    async def round(self) -> dict[str, Any]:
        """One full round: gather, decide, persist, broadcast, wait for every node to apply it."""
        t0 = time.perf_counter()
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
                log.exception("policy %s failed", name)
                self.errors[name] = repr(e)
        ops = [op.to_wire() for op in act.batch()]  # the wire form: applied here, then broadcast
        if act.refused:
            self.refused = (self.refused + act.refused)[-20:]
        t2 = time.perf_counter()
        prev = self.table.version
        if ops:
            self.table.apply({"v": prev + 1, "prev": prev, "ops": ops})
            if self._kv is not None:
                await self._kv.put(bkv.POLICY_KEY, self._snapshot())
        v = self.table.version
        msg = env.dumps({"v": v, "prev": prev if ops else v - 1, "ops": ops})
        acked = await self._broadcast(msg, set(metrics), v)
        t3 = time.perf_counter()
        stats = {"round": self.round_no, "v": v, "nodes": len(metrics), "applied_by": acked,
                 "futures": view.futures, "ops": len(ops),
                 "collect_ms": round((t1 - t0) * 1000, 3), "policy_ms": round((t2 - t1) * 1000, 3),
                 "broadcast_ms": round((t3 - t2) * 1000, 3), "round_ms": round((t3 - t0) * 1000, 3)}
        self.rounds = (self.rounds + [stats])[-50:]
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
        return {
            "policies": [p.name or type(p).__name__ for p in self.policies], "interval_s": self.interval,
            "rounds": self.round_no, "uptime_s": round(time.time() - self.started, 3),
            "last_round": recent[-1] if recent else None,
            "round_ms_median": round(statistics.median(r["round_ms"] for r in recent), 3) if recent else None,
            "decisions": self.table.summary(), "errors": dict(self.errors), "refused": list(self.refused),
        }

    def _on_status(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if reply:
            self.rt.send(reply, env.encode_result(self.status()))
