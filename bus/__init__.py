"""The bottom layer: NATS connection, embedded server, subjects, envelope codec, trace propagation."""
from .connection import ConnectOptions, open_connection
from .errors import (BadRequest, BusError, Cancelled, DeadlineExceeded, DependencyFailed, MalformedMessage,
                     NalarError, Overloaded, PayloadTooLarge, RemoteError, ServerNotFound, Timeout,
                     UnknownActor, UnknownMethod)
from .server import EmbeddedNats, find_server_binary
from .subjects import Subjects
from .transport import LocalTransport, NatsTransport, Transport

__all__ = [
    "BadRequest", "BusError", "Cancelled", "ConnectOptions", "DeadlineExceeded", "DependencyFailed",
    "EmbeddedNats", "LocalTransport", "MalformedMessage", "NalarError", "NatsTransport", "Overloaded",
    "PayloadTooLarge", "RemoteError", "ServerNotFound", "Subjects", "Timeout", "Transport", "UnknownActor",
    "UnknownMethod", "find_server_binary", "open_connection",
]
