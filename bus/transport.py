"""What the runtime needs from a message bus, with two implementations.

``NatsTransport`` is the real one. ``LocalTransport`` is an in-process loopback with the same
semantics nalar relies on (subject wildcards, queue groups, no-responders status, a payload limit),
used by local mode so the very same node and client code runs with no server.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable, Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .envelope import fits, header_size
from .errors import BusError, PayloadTooLarge

log = logging.getLogger("nalar.bus")
Handler = Callable[[str, str, bytes, "dict[str, str] | None"], None]
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"
SUB_PENDING_MSGS = 4 * 1024 * 1024
SUB_PENDING_BYTES = 2 * 1024 * 1024 * 1024


def is_no_responders(data: bytes, headers: dict[str, str] | None) -> bool:
    """Is this NATS's "no responders" answer to a request (empty body, ``Status: 503``)?"""
    return not data and headers is not None and headers.get(STATUS_HEADER) == NO_RESPONDERS


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Transport(Protocol):
    @property
    def max_payload(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    @property
    def connected_url(self) -> str:
        """The server this transport is connected to (``""`` in process)."""
        ...

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      reply: str = "") -> None: ...

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription: ...

    async def flush(self, timeout: float = 10.0) -> None: ...

    async def close(self) -> None: ...

    def jetstream(self) -> JetStreamContext | None:
        """The JetStream context for key-value buckets, or ``None`` where the bus has none (local mode)."""
        ...


class NatsTransport:
    """nats-py underneath; handlers get plain values, never the ``Msg`` (nothing retains it)."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._js: JetStreamContext | None = None
        #: Reply subjects a message may carry (prefixes; empty: any). A message asking to be answered
        #: elsewhere is dropped before any handler sees it, and ``on_bad_reply`` hears of it.
        self.replies_ok: tuple[str, ...] = ()
        self.on_bad_reply: Callable[[str, str], None] | None = None

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload or 0)

    @property
    def closed(self) -> bool:
        return bool(self.nc.is_closed)

    @property
    def connected_url(self) -> str:
        u = self.nc.connected_url
        return f"nats://{u.hostname}:{u.port}" if u else ""

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      reply: str = "") -> None:
        limit = self.nc.max_payload
        # the server counts headers too, and answers an oversized message by closing the connection
        if limit and not fits(data, headers, limit):
            raise PayloadTooLarge(len(data) + header_size(headers), limit)
        await self.nc.publish(subject, data, reply=reply, headers=headers)

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        async def cb(msg: Msg) -> None:
            reply = msg.reply
            if reply and self.replies_ok and not reply.startswith(self.replies_ok):
                if self.on_bad_reply is not None:
                    self.on_bad_reply(msg.subject, reply)
                return
            try:
                handler(msg.subject, reply, msg.data, msg.headers)
            except Exception:  # a bug in one handler must not stop the subscription
                log.exception("handler for %s failed", subject)

        return await self.nc.subscribe(subject, queue=queue, cb=cb, pending_msgs_limit=SUB_PENDING_MSGS,
                                       pending_bytes_limit=SUB_PENDING_BYTES)

    async def flush(self, timeout: float = 10.0) -> None:
        await self.nc.flush(max(1, round(timeout)))

    def jetstream(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    def refused(self, subject: str) -> bool:
        """Has the server refused a publish to ``subject`` on this connection (its permissions)?"""
        denied = getattr(self.nc, "denied", ())
        what = f'publish to "{subject}"'.lower()
        return any(what in d.lower() for d in denied)

    async def close(self) -> None:
        """Drain, else close; a server already gone is no error (there is nothing left to flush to)."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:
                try:
                    await self.nc.close()
                except Exception as e:
                    log.debug("closing a connection whose server is gone: %r", e)


def _matches(pattern: list[str], tokens: list[str]) -> bool:
    for i, p in enumerate(pattern):
        if p == ">":
            return len(tokens) > i
        if i >= len(tokens) or (p != "*" and p != tokens[i]):
            return False
    return len(pattern) == len(tokens)


class _LocalSub:
    __slots__ = ("bus", "pattern", "handler", "queue")

    def __init__(self, bus: "LocalTransport", pattern: str, handler: Handler, queue: str) -> None:
        self.bus = bus
        self.pattern = pattern.split(".")
        self.handler = handler
        self.queue = queue

    async def unsubscribe(self) -> None:
        if self in self.bus.subs:
            self.bus.subs.remove(self)


class LocalTransport:
    """An in-process bus for local mode (no server). Delivery is asynchronous, as over NATS."""

    def __init__(self, max_payload: int = 8 * 1024 * 1024) -> None:
        self.max_payload = max_payload
        self.subs: list[_LocalSub] = []
        self._rr = itertools.count()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected_url(self) -> str:
        return ""

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      reply: str = "") -> None:
        if self._closed:
            raise BusError("local bus is closed")
        if not fits(data, headers, self.max_payload):
            raise PayloadTooLarge(len(data) + header_size(headers), self.max_payload)
        tokens = subject.split(".")
        loop = asyncio.get_running_loop()
        groups: dict[str, list[_LocalSub]] = {}
        delivered = False
        for s in self.subs:
            if _matches(s.pattern, tokens):
                if s.queue:
                    groups.setdefault(s.queue, []).append(s)
                else:
                    loop.call_soon(s.handler, subject, reply, data, headers)
                    delivered = True
        for members in groups.values():
            s = members[next(self._rr) % len(members)]
            loop.call_soon(s.handler, subject, reply, data, headers)
            delivered = True
        if not delivered and reply:
            await self.publish(reply, b"", {STATUS_HEADER: NO_RESPONDERS})

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        sub = _LocalSub(self, subject, handler, queue)
        self.subs.append(sub)
        return sub

    async def flush(self, timeout: float = 10.0) -> None:
        await asyncio.sleep(0)

    def jetstream(self) -> None:
        return None  # no key-value buckets in process: local mode keeps placement and decisions in memory

    async def close(self) -> None:
        self._closed = True
        self.subs.clear()


Connector = Callable[[], Awaitable[Transport]]
