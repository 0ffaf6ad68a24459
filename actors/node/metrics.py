"""The node's Prometheus collector: what the other parts already keep, read at scrape time.

Nothing here runs per call. The executor counts into plain ints and ``actors/histogram.py``
histograms on the loop (``ActorGroup.run_hist``, ``.wait_hist``, ``.errors``); this collector turns
them into metric families when ``/metrics`` is asked for, on the same loop (``actors/prometheus.py``
says why), so it reads the node's dicts without a lock and without them changing under it.

Every series carries ``node``; per-actor ones ``actor``, per-instance ones ``instance`` too.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..prometheus import histogram_family
from ..runtime import Runtime
from .calls import ActorGroup, Book
from .enforce import Enforcer
from .report import engine_stats
from .sessions import Sessions

#: ``Sessions.status()`` keys exported as counters, and their series names.
STATE_COUNTERS = {"appends": "nalar_state_commits_total", "commit_batches": "nalar_state_store_batches_total",
                  "conflicts": "nalar_state_conflicts_total", "stale_reads": "nalar_state_stale_reads_total",
                  "caught_up": "nalar_state_catch_ups_total", "read_bytes": "nalar_state_catch_up_bytes_total",
                  "appended_bytes": "nalar_state_appended_bytes_total",
                  "answered_from_log": "nalar_state_answered_from_log_total"}
#: Engine stats (``EngineStats``) exported as gauges.
ENGINE_GAUGES = {"kv_usage": ("nalar_engine_kv_usage_ratio", "fraction of the engine's KV cache in use"),
                 "running": ("nalar_engine_running_sequences", "sequences the engine is running"),
                 "waiting": ("nalar_engine_waiting_sequences", "sequences waiting in the engine's own queue"),
                 "prefix_hit_rate": ("nalar_engine_prefix_cache_hit_ratio",
                                     "cached prompt tokens over prompt tokens, since the engine started")}


class NodeCollector(Collector):
    """Metric families of one node, built from its ``Book``, enforcer and session state."""

    def __init__(self, book: Book, rt: Runtime, enforcer: Enforcer, sessions: Callable[[], Sessions | None]) -> None:
        self.book = book
        self.rt = rt
        self.enforcer = enforcer
        self.sessions = sessions

    def describe(self) -> list[Metric]:
        return []  # built at each scrape: the registry must not collect to describe it

    def collect(self) -> Iterator[Metric]:
        book = self.book
        node = book.name
        groups = list(book.groups.values())
        yield from self._actors(node, groups)
        yield from self._instances(node, groups)
        yield from self._engines(node, groups)
        ev = CounterMetricFamily("nalar_node_calls", "calls this node received, answered, refused or passed on, "
                                 "by event", labels=["node", "event"])
        for k, v in book.counters.items():
            ev.add_metric([node, k], v)
        yield ev
        yield _gauge("nalar_node_in_flight", "calls accepted and not yet answered", node, len(book.active))
        yield from self._decisions(node)
        s = self.sessions()
        if s is not None:
            yield from _state(node, s.status())

    def _actors(self, node: str, groups: list[ActorGroup]) -> Iterator[Metric]:
        labels = ["node", "actor"]
        queued = GaugeMetricFamily("nalar_actor_queued", "calls waiting for an instance", labels=labels)
        running = GaugeMetricFamily("nalar_actor_running", "calls running", labels=labels)
        insts = GaugeMetricFamily("nalar_actor_instances", "live instances (not draining)", labels=labels)
        prov = GaugeMetricFamily("nalar_actor_provisioning", "instances starting", labels=labels)
        calls = CounterMetricFamily("nalar_calls", "calls answered, by outcome (ok or error)",
                                    labels=labels + ["outcome"])
        errs = CounterMetricFamily("nalar_call_errors", "calls that failed (or were refused), by error kind and "
                                   "type", labels=labels + ["kind", "type"])
        for g in groups:
            v = [node, g.name]
            queued.add_metric(v, g.queued)
            running.add_metric(v, sum(i.running for i in g.instances))
            insts.add_metric(v, len(g.live()))
            prov.add_metric(v, g.provisioning)
            calls.add_metric(v + ["ok"], g.done)
            calls.add_metric(v + ["error"], g.failed)
            for (kind, typ), n in g.errors.items():
                errs.add_metric(v + [kind, typ], n)
        yield from (queued, running, insts, prov, calls, errs)
        yield histogram_family("nalar_call_queue_wait_seconds", "time from a call's arrival at the node until "
                               "an instance starts it", labels, (([node, g.name], g.wait_hist) for g in groups))
        yield histogram_family("nalar_call_run_seconds", "time a call's method ran (state commit excluded)",
                               labels, (([node, g.name], g.run_hist) for g in groups))

    def _instances(self, node: str, groups: list[ActorGroup]) -> Iterator[Metric]:
        labels = ["node", "actor", "instance"]
        queued = GaugeMetricFamily("nalar_instance_queued", "calls routed to this instance, waiting for it",
                                   labels=labels)
        running = GaugeMetricFamily("nalar_instance_running", "calls running on this instance", labels=labels)
        handled = CounterMetricFamily("nalar_instance_handled", "calls this instance ran", labels=labels)
        draining = GaugeMetricFamily("nalar_instance_draining", "1 while the instance drains (killed)",
                                     labels=labels)
        for g in groups:
            for i in g.instances:
                v = [node, g.name, i.id]
                queued.add_metric(v, i.queued)
                running.add_metric(v, i.running)
                handled.add_metric(v, i.handled)
                draining.add_metric(v, 1 if i.draining else 0)
        yield from (queued, running, handled, draining)

    def _engines(self, node: str, groups: list[ActorGroup]) -> Iterator[Metric]:
        labels = ["node", "actor", "instance"]
        fams = {k: GaugeMetricFamily(name, doc, labels=labels) for k, (name, doc) in ENGINE_GAUGES.items()}
        for g in groups:
            for iid, st in (engine_stats(g) or {}).items():
                if not isinstance(st, dict):  # an engine_stats() of the user's that is not a dict: not ours to fail on
                    continue
                for k, fam in fams.items():
                    x = st.get(k)
                    if isinstance(x, (int, float)) and not isinstance(x, bool):
                        fam.add_metric([node, g.name, iid], float(x))
        yield from fams.values()

    def _decisions(self, node: str) -> Iterator[Metric]:
        en = self.enforcer
        st: dict[str, Any] = en.status()
        yield _gauge("nalar_decisions_version", "the version of the decisions in force here", node,
                     st["applied_version"])
        yield _gauge("nalar_decisions_term", "the policy leader's term this node follows", node, st["term"])
        applied = CounterMetricFamily("nalar_decision_batches_applied", "decision batches this node carried out",
                                      labels=["node"])
        applied.add_metric([node], st["batches"])
        yield applied
        refused = CounterMetricFamily("nalar_decisions_refused", "decisions (ops or batches) this node refused, "
                                      "by kind", labels=["node", "kind"])
        for kind, n in sorted(st["refused"].items()):
            refused.add_metric([node, kind], n)
        yield refused
        acts = CounterMetricFamily("nalar_control_actions", "what decisions made this node do, by action",
                                   labels=["node", "action"])
        for k in ("migrated", "provisioned", "killed"):
            acts.add_metric([node, k], st.get(k, 0))
        yield acts


def _state(node: str, st: dict[str, Any]) -> Iterator[Metric]:
    for key, name in STATE_COUNTERS.items():
        if isinstance(st.get(key), int):
            fam = CounterMetricFamily(name[:-len("_total")], f"session state: {key.replace('_', ' ')}",
                                      labels=["node"])
            fam.add_metric([node], st[key])
            yield fam
    yield _gauge("nalar_state_units", "session units whose state is current on this node", node, st["units"])


def _gauge(name: str, doc: str, node: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["node"])
    g.add_metric([node], value)
    return g
