"""Actors, hints, stubs, futures, the per-process runtime, the node that hosts instances, local mode.

Where things live, by who reads them:

- what users write against: ``base.py`` (Agent, Tool, Model), ``hints.py``, ``stub.py``,
  ``future.py`` (Future, gather, wait), ``context.py`` (the call scope: ``nalar.session()``,
  ``nalar.deadline()``, and what child calls inherit), ``retry.py`` (RetryPolicy)
- the caller side, in every process: ``runtime.py`` (calls, replies, retries, requests and scatter),
  ``deadlines.py`` (the timer wheel), ``client.py`` (``nalar.connect``), ``loop.py`` (a loop on a
  thread), ``loading.py`` (``module:Class`` names)
- metrics, in every serving process: ``histogram.py`` (lock-free fixed-bucket latency histograms with
  a recent window), ``prometheus.py`` (``/metrics`` served from the loop, histograms exported)
- ``control/``: the contract between the policy actor and each node (decision ops, the decision table,
  metrics rows)
- ``node/``: the executor, one part per file (its ``__init__`` has the map), and local mode
- ``models/``: the LLM actor and its engines
"""
from .base import Actor, Agent, Model, Tool
from .client import Client, connect, connect_async
from .context import deadline, session
from .future import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future, gather, wait
from .hints import Hints, hints, hints_of
from .node.local import Local, local
from .retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from .runtime import Runtime, current_runtime
from .stub import Stub, stub

__all__ = [
    "ALL_COMPLETED", "Actor", "DEFAULT_RETRY", "NO_RETRY", "RetryPolicy", "Agent", "Client", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Future", "Hints", "Local",
    "Model", "Runtime", "Stub", "Tool", "connect", "connect_async", "current_runtime", "deadline", "gather", "hints",
    "hints_of", "local", "session", "stub", "wait",
]
