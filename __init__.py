"""nalar: serve multi-step LLM agent applications.

Agents, tools and models are actors written as plain Python classes; every call between them is a
future carried over NATS. See README.md.

The imports below are absolute on purpose: pytest imports this file as a stray module when it walks up
from tests/ (the repository root is the package), and absolute imports make that a harmless re-export
of the installed ``nalar`` instead of an error or a second copy of the package.
"""
from nalar.actors import (ALL_COMPLETED, DEFAULT_RETRY, NO_RETRY, RetryPolicy, FIRST_COMPLETED, FIRST_EXCEPTION, Actor, Agent, Client, Future, Hints, Local,
                     Model, Tool, connect, connect_async, deadline, gather, hints, local, session, stub, wait)
from nalar.actors import models
from nalar.actors.preempt import PREEMPTED, Preempted, is_preemption, preemptions
from nalar.actors.models.alias import install as _install_models_alias
from nalar.bus.errors import (BadRequest, BusError, Cancelled, Conflict, DeadlineExceeded, DependencyFailed,
                              MalformedMessage, NalarError, Overloaded, PayloadTooLarge, RemoteError, ServerNotFound,
                              StateError, StateFull, Timeout, Unavailable, UnknownActor, UnknownMethod)
from nalar.state.managed import ManagedDict, ManagedList, ManagedValue, managed_dict, managed_list, managed_value

__version__ = "0.1.0"

_install_models_alias()  # `import nalar.models`, `from nalar.models import LLM`: a module, not only an attribute

__all__ = [
    "ALL_COMPLETED", "Actor", "DEFAULT_RETRY", "NO_RETRY", "RetryPolicy", "Unavailable", "Agent", "BadRequest", "BusError", "Cancelled", "Client", "Conflict", "DeadlineExceeded",
    "ManagedDict", "ManagedList", "ManagedValue", "StateError", "StateFull", "managed_dict", "managed_list",
    "managed_value", "models", "PREEMPTED", "Preempted", "is_preemption", "preemptions",
    "DependencyFailed", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Future", "Hints", "Local", "MalformedMessage",
    "Model", "NalarError", "Overloaded", "PayloadTooLarge", "RemoteError", "ServerNotFound", "Timeout", "Tool",
    "UnknownActor", "UnknownMethod", "connect", "connect_async", "deadline", "gather", "hints", "local", "session", "stub",
    "wait",
]
