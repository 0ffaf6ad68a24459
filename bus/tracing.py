"""OpenTelemetry tracing: on when the standard ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables say so.

Off (the default), ``TRACER`` is ``None`` and the call path pays one attribute check. On, spans are
exported over OTLP/HTTP by a batch processor; the W3C ``traceparent`` rides in NATS headers so one
request is one trace across processes. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
turn it off even with an endpoint set.
"""
from __future__ import annotations

import os
from typing import Any

TRACER: Any = None
_provider: Any = None


def wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(node: str | None = None) -> bool:
    """Install the exporter once per process if the environment asks for it; return whether on."""
    global TRACER, _provider
    if TRACER is not None or not wanted():
        return TRACER is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs: dict[str, Any] = {"service.name": os.environ.get("OTEL_SERVICE_NAME", "nalar")}
    if node:
        attrs["nalar.node"] = node
    _provider = TracerProvider(resource=Resource.create(attrs))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    try:
        trace.set_tracer_provider(_provider)
    except Exception:  # a provider was set already (by the application): keep ours private
        pass
    TRACER = _provider.get_tracer("nalar")
    return True


def shutdown() -> None:
    """Flush and stop the exporter (called when a node or client closes)."""
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER = None
    _provider = None


def traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_from(traceparent_header: str | None) -> Any:
    """An OpenTelemetry context whose parent is the remote span named by ``traceparent``."""
    if not traceparent_header:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent_header})


def context_of(span: Any) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def current_context() -> Any:
    from opentelemetry import context

    return context.get_current()
