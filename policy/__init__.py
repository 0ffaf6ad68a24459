"""The global policy actor, the policy primitives and the built-in policies.

``nalar policy`` runs the actor; ``nalar up`` runs it beside its node. A user policy is a class with
``decide(view, act)`` (see ``api.Policy``), named on the command line as ``module:Class``.
"""
from __future__ import annotations

import importlib
import os
import sys

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
        module_name, _, class_name = item.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{item!r}: cannot import {module_name!r}: {e}") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ValueError(f"{item!r}: {class_name} is not a nalar.policy.Policy subclass")
        p = cls()
        p.name = p.name or class_name
        out.append(p)
    return out


__all__ = ["Actions", "ActorView", "BUILTIN", "DEFAULT", "InstanceView", "Policy", "PolicyActor", "View",
           "Waiting", "load_policies"]
