"""Actors, hints, stubs, futures, the per-process runtime, the node that hosts instances, local mode."""
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
