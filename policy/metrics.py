"""The policy actor's Prometheus collector: rounds, their duration, ops decided by kind, refusals, term.

A round ends with one ``RoundTally.round`` (a histogram observation and a few dict increments, once a
second), and the collector reads it and the actor's status at scrape time, on the actor's loop
(``actors/prometheus.py`` says why).
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..actors.histogram import Histogram
from ..actors.control import DecisionTable
from ..actors.prometheus import histogram_family


class RoundTally:
    """What the rounds decided, counted as they end."""

    def __init__(self) -> None:
        self.duration = Histogram()
        self.ops: dict[str, int] = {}  # op kind -> ops decided
        self.refused = 0  # ops the policies asked for and ``Actions`` refused (hints, bounds)
        self.rounds = 0  # rounds run to the end (skipped ones, as a standby, are not counted)

    def round(self, round_ms: float, ops: list[Any], refused: int) -> None:
        self.rounds += 1
        self.duration.observe(round_ms, time.monotonic())
        for op in ops:
            kind = str(op[0]) if isinstance(op, (list, tuple)) and op else "?"
            self.ops[kind] = self.ops.get(kind, 0) + 1
        self.refused += refused


class Observed(Protocol):
    """What the collector reads of a ``PolicyActor`` (a Protocol: ``actor.py`` imports this file)."""

    name: str
    tally: RoundTally
    table: DecisionTable
    errors: dict[str, str]

    @property
    def role(self) -> str: ...

    @property
    def term(self) -> int: ...


class PolicyCollector(Collector):
    """Metric families of one policy actor (labelled ``policy``: its name)."""

    def __init__(self, actor: Observed) -> None:
        self.actor = actor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        a = self.actor
        t = a.tally
        name = a.name
        rounds = CounterMetricFamily("nalar_policy_rounds", "control rounds run to the end", labels=["policy"])
        rounds.add_metric([name], t.rounds)
        yield rounds
        yield histogram_family("nalar_policy_round_seconds", "a control round's duration (gather, decide, "
                               "persist, broadcast)", ["policy"], [([name], t.duration)])
        ops = CounterMetricFamily("nalar_policy_ops_decided", "decision ops broadcast, by kind",
                                  labels=["policy", "kind"])
        for kind, n in sorted(t.ops.items()):
            ops.add_metric([name, kind], n)
        yield ops
        ref = CounterMetricFamily("nalar_policy_ops_refused", "ops policies asked for that were refused (hints)",
                                  labels=["policy"])
        ref.add_metric([name], t.refused)
        yield ref
        role = a.role
        leader = GaugeMetricFamily("nalar_policy_leader", "1 while this actor leads (or decides alone)",
                                   labels=["policy", "role"])
        leader.add_metric([name, role], 1 if role in ("leader", "single") else 0)
        yield leader
        yield _one("nalar_policy_term", "the term this actor leads or last led", name, a.term)
        yield _one("nalar_policy_decisions_version", "the version of the decisions in force", name, a.table.version)
        yield _one("nalar_policy_errors", "failures going on now (a policy, the round, the lease)", name,
                   len(a.errors))


def _one(metric: str, doc: str, name: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(metric, doc, labels=["policy"])
    g.add_metric([name], value)
    return g
