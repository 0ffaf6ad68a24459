"""nalar: serve multi-step LLM agent applications.

Agents, tools and models are actors written as plain Python classes; every call between them is a
future carried over NATS. See README.md.
"""
from .actors import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Actor, Agent, Client, Future, Hints, Local,
                     Model, Tool, connect, connect_async, deadline, gather, hints, local, session, stub, wait)
from .bus.errors import (BadRequest, BusError, Cancelled, DeadlineExceeded, DependencyFailed, MalformedMessage,
                         NalarError, Overloaded, PayloadTooLarge, RemoteError, ServerNotFound, Timeout,
                         UnknownActor, UnknownMethod)

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED", "Actor", "Agent", "BadRequest", "BusError", "Cancelled", "Client", "DeadlineExceeded",
    "DependencyFailed", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Future", "Hints", "Local", "MalformedMessage",
    "Model", "NalarError", "Overloaded", "PayloadTooLarge", "RemoteError", "ServerNotFound", "Timeout", "Tool",
    "UnknownActor", "UnknownMethod", "connect", "connect_async", "deadline", "gather", "hints", "local", "session", "stub",
    "wait",
]
