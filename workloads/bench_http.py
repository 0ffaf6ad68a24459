"""The benchmarks' HTTP side (``--via http``): a ``nalar gateway`` process, and a lean keep-alive client.

The client is a few lines of asyncio streams, not httpx: on two cores a full HTTP client costs more
per request than the gateway being measured, and its cost would be counted as the gateway's. It
speaks just what the gateway's actor endpoint answers (HTTP/1.1, ``Content-Length`` bodies).
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson

from .bench_util import Child


def start_gateway(url: str, namespace: str, port: int) -> tuple[Child, str]:
    """A ``nalar gateway`` on loopback for this run; returns it and its base URL."""
    child = Child([sys.executable, "-m", "nalar.cli.main", "gateway", "--port", str(port), "--nats", url,
                   "--namespace", namespace], "listening on")
    return child, f"http://127.0.0.1:{port}"


class HTTPFailed(Exception):
    """A request answered with a status other than 200: the gateway's error body, as it came."""

    def __init__(self, status: int, body: bytes) -> None:
        try:
            err = orjson.loads(body).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            err = {}
        self.status = status
        self.type = err.get("type") or f"HTTP {status}"
        super().__init__(f"HTTP {status}: {err.get('message') or body[:200]!r}")


class HttpClient:
    """Keep-alive HTTP/1.1 connections to one host, one request at a time on each."""

    def __init__(self, base: str) -> None:
        hostport = base.split("://", 1)[1].rstrip("/")
        self.host, _, port = hostport.partition(":")
        self.port = int(port or 80)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.all: list[asyncio.StreamWriter] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
        """The JSON value of a 200's body; ``HTTPFailed`` for any other status. A kept connection the
        server closed meanwhile (uvicorn closes idle ones after 5 s) is replaced, once."""
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n{head}\r\n").encode() + body
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else await self._connect()
            got = await self._exchange(conn, request)
            if got is not None:
                break
            if not reused:
                raise ConnectionError(f"{self.host}:{self.port} closed a new connection without an answer")
        status, data = got
        self.idle.append(conn)
        if status != 200:
            raise HTTPFailed(status, data)
        return orjson.loads(data)

    @staticmethod
    async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        request: bytes) -> tuple[int, bytes] | None:
        """(status, body), or None if the connection was closed before an answer."""
        reader, writer = conn
        try:
            writer.write(request)
            status_line = await reader.readline()
            if not status_line:
                writer.close()
                return None
            status = int(status_line.split(b" ", 2)[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await reader.readexactly(length)
        except ConnectionResetError:
            writer.close()
            return None
        except BaseException:
            writer.close()
            raise

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.all.append(writer)
        return reader, writer

    async def close(self) -> None:
        for w in self.all:
            w.close()
        self.idle.clear()


class HttpStub:
    """A stub's shape over the gateway's actor endpoint: ``stub.options(session=, timeout=).method(*args)``."""

    def __init__(self, http: HttpClient, actor: str, headers: dict[str, str] | None = None) -> None:
        self.http, self.actor, self.headers = http, actor, headers or {}

    def options(self, session: str | None = None, timeout: float | None = None) -> "HttpStub":
        h = dict(self.headers)
        if session is not None:
            h["X-Session-Id"] = session
        if timeout is not None:
            h["X-Timeout"] = str(timeout)
        return HttpStub(self.http, self.actor, h)

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(*args: Any) -> Any:
            return (await self.http.post(f"/v1/actors/{self.actor}/{method}", orjson.dumps(list(args)),
                                         self.headers))["result"]
        return call
