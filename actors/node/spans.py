"""A call's server-side spans (only when tracing is on): the call itself and its wait in a queue."""
from __future__ import annotations

from typing import Any

from ...bus import tracing
from .calls import Call


def receive(c: Call, node: str) -> None:
    """Open the call's span (a child of its caller's, from ``traceparent``) and its queue span."""
    from opentelemetry.trace import SpanKind

    m = c.meta
    parent = tracing.context_from(m.traceparent)
    name = c.group.name
    c.span = tracing.TRACER.start_span(
        f"{name}.{c.method}", context=parent, kind=SpanKind.SERVER,
        attributes={"nalar.future": m.id, "nalar.actor": name, "nalar.method": c.method,
                    "nalar.node": node, "nalar.request": m.request,
                    **({"nalar.session": m.session} if m.session else {})})
    c.otel_ctx = tracing.context_of(c.span)
    c.qspan = tracing.TRACER.start_span("queue", context=c.otel_ctx)


def dequeued(c: Call) -> None:
    if c.qspan is not None:
        c.qspan.end()
        c.qspan = None


def finish(c: Call, ok: bool, error: dict[str, Any] | None = None, handed_to: str | None = None) -> None:
    """Close the call's spans; a failed call's span has error status with its type and message."""
    dequeued(c)
    span, c.span = c.span, None
    if span is None:
        return
    if c.inst is not None:
        span.set_attribute("nalar.instance", c.inst.id)
    if handed_to is not None:
        span.set_attribute("nalar.handed_to", handed_to)
    if not ok:
        from opentelemetry.trace import Status, StatusCode

        e = error or {}
        span.set_status(Status(StatusCode.ERROR, f"{e.get('type')}: {str(e.get('message'))[:200]}"))
    span.end()
