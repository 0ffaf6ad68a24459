"""A call's server-side spans (only when tracing is on): the call itself, its wait in a queue, its commit.

Attributes follow OpenTelemetry's messaging and RPC conventions, nalar's own under ``nalar.``
(``bus/tracing.py``); a failed call's span gets an ``exception`` event with the traceback.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from ...bus import tracing
from .calls import Call


def receive(c: Call, node: str, subject: str = "") -> None:
    """Open the call's span (a child of its caller's, from ``traceparent``) and its queue span."""
    from opentelemetry.trace import SpanKind

    m = c.meta
    parent = tracing.context_from(m.traceparent)
    g = c.group
    name = g.name
    attrs = tracing.call_attributes(name, c.method, subject, m)
    attrs["nalar.node"] = node
    if m.fwd:
        attrs["nalar.forwarded_by"] = m.fwd
    c.span = tracing.TRACER.start_span(f"{name}.{c.method}", context=parent, kind=SpanKind.SERVER,
                                       attributes=attrs)
    c.otel_ctx = tracing.context_of(c.span)
    c.qspan = tracing.TRACER.start_span("queue", context=c.otel_ctx, attributes={
        "nalar.node": node, "rpc.service": name, "nalar.queue.length": g.queued,
        "nalar.priority": m.priority})


def dequeued(c: Call) -> None:
    q = c.qspan
    if q is not None:
        c.qspan = None
        if c.inst is not None:
            q.set_attribute("nalar.instance", c.inst.id)
        if c.arrived:
            q.set_attribute("nalar.queue.wait_ms", round((time.monotonic() - c.arrived) * 1000, 3))
        q.end()


def finish(c: Call, ok: bool, error: dict[str, Any] | None = None, handed_to: str | None = None) -> None:
    """Close the call's spans; a failed call's span has error status and an ``exception`` event."""
    dequeued(c)
    span, c.span = c.span, None
    if span is None:
        return
    if c.inst is not None:
        span.set_attribute("nalar.instance", c.inst.id)
    if c.conflicts:
        span.set_attribute("nalar.state.conflicts", c.conflicts)
    if handed_to is not None:
        span.set_attribute("nalar.handed_to", handed_to)
    if not ok:
        e = error or {}
        tracing.record_error(span, str(e.get("type") or "Exception"), str(e.get("message") or ""),
                             str(e.get("traceback") or ""), str(e.get("kind") or ""))
    span.end()


Done = Callable[[Call, Any, bytes], None]


def commit(c: Call, changes: int, done: Done) -> Done:
    """A span for ``c``'s state commit (a child of its call's span); ``done`` wrapped to close it with
    the version committed (``nalar.state.version``) or the error."""
    txn = c.txn
    base = txn.base if txn is not None else None
    attrs: dict[str, Any] = {"nalar.future_id": c.id, "rpc.service": c.group.name, "nalar.state.changes": changes}
    if c.meta.session is not None:
        attrs["nalar.session"] = c.meta.session
    if isinstance(base, dict) and isinstance(base.get("v"), int):
        attrs["nalar.state.base_version"] = base["v"]
    span = tracing.TRACER.start_span("state commit", context=c.otel_ctx, attributes=attrs)

    def committed(c: Call, outcome: Any, body: bytes) -> None:
        kind = outcome[0]
        span.set_attribute("nalar.state.outcome", kind)
        if kind == "ok" and isinstance(outcome[1], int):
            span.set_attribute("nalar.state.version", outcome[1])
        elif kind == "error":
            err = outcome[1]
            if isinstance(err, BaseException):
                tracing.record_exception(span, err)
        span.end()
        done(c, outcome, body)

    return committed
