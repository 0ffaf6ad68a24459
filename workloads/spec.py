"""What a reference workload tells ``nalar bench``: what each node serves, how sessions arrive, and
which policies the nalar configuration runs. The harness (``bench_workload.py``) knows nothing else
about a workload, so every workload runs on every model backend and under both configurations.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class Turn:
    """One request of a session: the entry method's arguments, sent ``think_s`` after the previous
    turn's answer (human think time between follow-ups; 0 for the first turn)."""

    args: list[Any]
    think_s: float = 0.0


@dataclass
class Session:
    id: str
    turns: list[Turn]


@dataclass
class WorkloadSpec:
    name: str
    summary: str
    #: ``Actor.method`` each turn calls, with the session id as the call's session.
    entry: str
    #: Per node, the actor specs it serves (``module:Class=N``). Model instances stand for GPUs, so
    #: both configurations get the same number of them; only how they are used differs.
    nodes: list[list[str]]
    #: Built-in (or ``module:Class``) policies the nalar configuration runs.
    policies: tuple[str, ...]
    #: ``sessions(rng, rps, duration)``: (arrival second, session) in arrival order, Poisson at ``rps``
    #: new sessions per second over ``duration`` seconds.
    sessions: Callable[[random.Random, float, float], Iterator[tuple[float, Session]]]
    #: Per node for the baseline, when its static allocation differs (default: ``nodes``).
    baseline_nodes: list[list[str]] | None = None
    #: Default request rate and duration for ``nalar bench NAME``.
    default_rps: float = 4.0
    default_duration: float = 60.0
    #: Deadline of one turn, seconds.
    timeout_s: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)


def poisson_arrivals(rng: random.Random, rps: float, duration: float) -> Iterator[float]:
    """Open-loop arrival times: exponential gaps at ``rps`` per second, up to ``duration``."""
    if rps <= 0:
        raise ValueError("--rps must be > 0")
    t = rng.expovariate(rps)
    while t < duration:
        yield t
        t += rng.expovariate(rps)
