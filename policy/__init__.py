"""The global policy actor, the policy primitives and the built-in policies.

``nalar policy`` runs the actor; ``nalar up`` runs it beside its node. A user policy is a class with
``decide(view, act)`` (see ``api.Policy``), named on the command line as ``module:Class``.

Where things live (it imports ``actors`` and ``bus``, never the other way):

    actor.py       ``PolicyActor``: each round, gather metrics, run the policies, broadcast one batch
    lease.py       ``Lease``: the leader lease in ``nalar_<ns>_leader``; only its holder runs rounds; its
                   revision is the leader's term, which every batch carries
    api.py         the primitives: what a policy sees (``View``) and may do (``Actions``); ``Policy``
    builtin.py     the built-in policies by name (``BUILTIN``) and the default set (``DEFAULT``)
    metrics.py     ``RoundTally`` (what rounds decided) and the actor's Prometheus collector
    __init__.py    ``load_policies``: built-in names and ``module:Class`` specs to instances
"""
from __future__ import annotations

import os

from ..actors.loading import load_class
from .actor import PolicyActor
from .api import Actions, ActorView, InstanceView, Policy, View, Waiting
from .builtin import BUILTIN, DEFAULT


def load_policies(names: str | None = None) -> list[Policy]:
    """Policies from a comma-separated list of built-in names and ``module:Class`` specs.

    ``None`` reads ``$NALAR_POLICIES``, else the defaults (``balance,head-of-line,affinity``);
    ``""`` or ``"none"`` installs none (the actor still gathers metrics and keeps decisions in force).
    """
    if names is None:
        names = os.environ.get("NALAR_POLICIES", ",".join(DEFAULT))
    out: list[Policy] = []
    for item in (n.strip() for n in names.split(",")):
        if not item or item == "none":
            continue
        if ":" not in item:
            cls = BUILTIN.get(item)
            if cls is None:
                raise ValueError(f"unknown policy {item!r}; built-in: {sorted(BUILTIN)}, or module:Class")
            out.append(cls())
            continue
        user = load_class(item, Policy, "nalar.policy.Policy subclass")
        p: Policy = user()
        p.name = p.name or user.__name__
        out.append(p)
    return out


__all__ = ["Actions", "ActorView", "BUILTIN", "DEFAULT", "InstanceView", "Policy", "PolicyActor", "View",
           "Waiting", "load_policies"]
