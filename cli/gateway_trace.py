"""The gateway's HTTP span: one SERVER span per request, the parent of every call the request makes.

A plain ASGI middleware (added only when tracing is on, so the gateway pays nothing otherwise). It
continues a trace the HTTP client started (``traceparent``), names the span by the route
(``POST /v1/chat/completions``), sets OpenTelemetry's HTTP attributes and nalar's session and
priority, and makes itself the current span while the request is handled: the runtime's call spans
(``call Actor.method``) are its children, and through NATS headers so is the whole call tree. A
streamed response's span ends with its last event.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..bus import tracing

Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

#: Path templates, for span names and ``http.route`` (a name per route, not per actor or model).
_ROUTES = (("/v1/actors/", "/v1/actors/{actor}/{method}"), ("/v1/chat/completions", "/v1/chat/completions"),
           ("/v1/completions", "/v1/completions"), ("/v1/models", "/v1/models"), ("/metrics", "/metrics"))


def route_of(path: str) -> str:
    for prefix, template in _ROUTES:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return template
    return ""


class TraceMiddleware:
    """Wraps the gateway's app: each HTTP request in its span."""

    def __init__(self, app: ASGI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        tracer = tracing.TRACER
        if scope["type"] != "http" or tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        method, path = scope.get("method", "GET"), scope.get("path", "")
        route = route_of(path)
        attrs: dict[str, Any] = {"http.request.method": method, "url.path": path,
                                 "url.scheme": scope.get("scheme", "http"), "network.protocol.name": "http",
                                 "network.protocol.version": scope.get("http_version", "1.1")}
        if route:
            attrs["http.route"] = route
        server, client = scope.get("server"), scope.get("client")
        if server:
            attrs["server.address"], attrs["server.port"] = server[0], server[1]
        if client:
            attrs["client.address"] = client[0]
        if "user-agent" in headers:
            attrs["user_agent.original"] = headers["user-agent"][:256]
        if headers.get("x-session-id"):
            attrs["nalar.session"] = headers["x-session-id"][:256]
        if headers.get("x-priority"):
            attrs["nalar.priority"] = headers["x-priority"][:32]
        parent = tracing.context_from(headers.get("traceparent"))
        span = tracer.start_span(f"{method} {route or path}", context=parent, kind=SpanKind.SERVER,
                                 attributes=attrs)
        token = context.attach(trace.set_span_in_context(span))
        status = [0]

        async def send_traced(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                span.set_attribute("http.response.status_code", status[0])
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except BaseException as e:
            tracing.record_exception(span, e)
            raise
        finally:
            if status[0] >= 500:
                span.set_attribute("error.type", str(status[0]))
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status[0]}"))
            context.detach(token)
            span.end()
