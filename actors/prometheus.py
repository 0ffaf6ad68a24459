"""Serving Prometheus's ``/metrics`` from the process's asyncio loop, and exporting ``Histogram``.

Why not ``prometheus_client.start_http_server``: it serves from a thread of its own, and collecting
would then read the node's dicts (groups, instances, calls in flight) while the loop changes them
(``RuntimeError: dictionary changed size during iteration``, or worse, a torn read). Here a tiny HTTP
handler on the loop itself answers each scrape: the collectors run between two of the loop's
callbacks, see a consistent picture, and need no lock; the loop's own histograms stay lock-free
(``actors/histogram.py``). A scrape costs the loop the time to render the text (about a millisecond
for a node with a few actors), once per scrape interval.

The server speaks just enough HTTP/1.1 for a scraper: ``GET /metrics`` (and ``/``), one request per
connection, bounded request size and time. Each process has its own ``CollectorRegistry`` (several
nodes in one process, as tests run them, never collide), with the process collector besides.
``prometheus_client`` itself is imported only once metrics are served (the CLI's other commands
start without it).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING, Iterable

from .histogram import Histogram

if TYPE_CHECKING:  # prometheus_client is imported by what serves metrics, not by every command's start
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily

log = logging.getLogger("nalar.metrics")

PORT_ENV = "NALAR_METRICS_PORT"
ADDR_ENV = "NALAR_METRICS_ADDR"
DEFAULT_ADDR = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192  # bytes of request line and headers a scraper may send
_READ_TIMEOUT_S = 5.0
#: Connections held open at once; past that a new one is closed at once, so idle or slow clients (each
#: held up to the read timeout) cannot take the process's file descriptors.
MAX_CONNECTIONS = 64


def new_registry() -> "CollectorRegistry":
    """A registry of this process's own (not the library's global one), with its CPU and memory."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    return reg


def render(registry: "CollectorRegistry") -> bytes:
    """The exposition text, collected now (call it on the loop that owns what the collectors read)."""
    from prometheus_client import generate_latest

    return generate_latest(registry)


def histogram_family(name: str, doc: str, labels: list[str],
                     items: Iterable[tuple[list[str], Histogram]]) -> "HistogramMetricFamily":
    """A Prometheus histogram in seconds (its base unit) from ``Histogram``s kept in milliseconds."""
    from prometheus_client.core import HistogramMetricFamily

    fam = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in items:
        buckets = [(_le(b), float(c)) for b, c in h.cumulative()]
        fam.add_metric(values, buckets, h.sum / 1000.0)
    return fam


def _le(ms: float) -> str:
    if ms == float("inf"):
        return "+Inf"
    return repr(ms / 1000.0)


class MetricsServer:
    """``/metrics`` over HTTP on the running loop, rendering ``registry`` at each request."""

    def __init__(self, registry: "CollectorRegistry", addr: str = DEFAULT_ADDR, port: int = 0) -> None:
        self.registry = registry
        self.addr = addr
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self.scrapes = 0
        self.open = 0  # connections being served now
        self.refused = 0  # connections closed at once, past MAX_CONNECTIONS

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    async def start(self, pick_free: bool = False) -> "MetricsServer":
        """Listen on ``addr:port``; a busy port is an ``OSError``, or with ``pick_free`` any free one."""
        try:
            self._server = await asyncio.start_server(self._handle, self.addr, self.port, reuse_address=True)
        except OSError as e:
            if not (pick_free and e.errno == errno.EADDRINUSE):
                raise OSError(e.errno, f"cannot serve metrics on {self.addr}:{self.port}: {e.strerror}") from None
            self._server = await asyncio.start_server(self._handle, self.addr, 0, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self.open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            status, body, ctype = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as e:  # a collector failed: the scraper sees a 500, the log says why
            log.exception("collecting metrics failed")
            status, body, ctype = "500 Internal Server Error", f"collecting metrics failed: {e!r}\n".encode(), \
                "text/plain; charset=utf-8"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        try:
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > _MAX_REQUEST:
            return "431 Request Header Fields Too Large", b"", "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] != b"GET":
            return "405 Method Not Allowed", b"GET /metrics only\n", "text/plain; charset=utf-8"
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/metrics", b"/"):
            return "404 Not Found", b"try /metrics\n", "text/plain; charset=utf-8"
        self.scrapes += 1
        body = render(self.registry)
        return "200 OK", body, CONTENT_TYPE


def port_from_env(default: int = 0) -> int:
    """``$NALAR_METRICS_PORT`` (0: off), else ``default``."""
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"${PORT_ENV}={raw!r}: expected a port number, 0-65535 (0: no metrics)")
    return int(raw)
