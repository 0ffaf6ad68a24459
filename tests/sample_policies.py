"""Policies used by tests/test_control.py (``nalar policy --policies sample_policies:Declared``)."""
from __future__ import annotations

import os
from typing import Any, Callable

import orjson

from nalar.policy import Actions, Policy, View


class Scripted(Policy):
    """Runs each queued step once, on the next round: a test's way of issuing primitives."""

    name = "scripted"

    def __init__(self) -> None:
        self.steps: list[Callable[[View, Actions], Any]] = []

    def decide(self, view: View, act: Actions) -> None:
        steps, self.steps = self.steps, []
        for step in steps:
            step(view, act)


class Declared(Policy):
    """Says every round what it wants, from ``$NALAR_TEST_DECLARED`` (JSON):

    ``{"routes": [[session, actor, instance], ...], "instances": [[actor, node, count], ...]}``.
    Instances are provisioned up to ``count`` per node, counting what the decisions in force already
    ask for, so re-running it (or restarting the policy actor) never provisions twice.
    """

    name = "declared"

    def __init__(self) -> None:
        self.want = orjson.loads(os.environ.get("NALAR_TEST_DECLARED", "{}"))

    def decide(self, view: View, act: Actions) -> None:
        for session, actor, inst in self.want.get("routes", []):
            if inst in view.instances:
                act.route(session, actor, inst)
        for actor, node, count in self.want.get("instances", []):
            av = view.actors.get(actor)
            if av is None or node not in view.nodes:
                continue
            wanted = view.table.scale.get(node, {}).get(actor)
            have = wanted[0] if wanted is not None else len(av.on(node))
            for _ in range(count - have):
                act.provision(actor, node)


class Prioritize(Policy):
    """Raises one session's priority in the first round that sees a node (tests/test_tracing.py's round span)."""

    name = "prioritize"

    def __init__(self) -> None:
        self.done = False

    def decide(self, view: View, act: Actions) -> None:
        if not self.done and view.nodes:
            act.set_priority("traced-session", 7)
            act.set_priority("other-session", 3)
            self.done = True
