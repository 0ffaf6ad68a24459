"""OpenTelemetry tracing: on when the standard ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables say so.

Off (the default), ``TRACER`` is ``None`` and the call path pays one attribute check. On, spans are
exported over OTLP/HTTP by a batch processor; the W3C ``traceparent`` rides in NATS headers so one
request is one trace across processes. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
turn it off even with an endpoint set.

Spans follow OpenTelemetry's semantic conventions for messaging and RPC (``messaging.system=nats``,
``messaging.destination.name``, ``rpc.system=nalar``, ``rpc.service``, ``rpc.method``); nalar's own
attributes are under ``nalar.`` (``call_attributes``). A failed call's span has status ERROR and an
``exception`` event carrying the (remote) traceback, on both sides (``record_error``).

``service.name``: each process reports its own. ``OTEL_SERVICE_NAME`` names the processes it is set for;
where ``NALAR_SERVICE_ROLE`` is set too (a comma list: ``node``, ``policy``, ``cli``, ``client``), only
processes of those roles take it, so a client or ``nalar call`` started in a node's service
environment reports ``nalar-client``/``nalar-cli``, not the node's name. Otherwise a process is
``nalar-<role>``.
"""
from __future__ import annotations

import os
from typing import Any

TRACER: Any = None
_provider: Any = None
#: What this process is (``set_role``): ``client`` unless the CLI says ``node``, ``policy`` or ``cli``.
_role = "client"


def wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def set_role(role: str) -> None:
    """Say what this process is, before its first runtime starts (the CLI does, per command)."""
    global _role
    _role = role


def service_name(role: str | None = None) -> str:
    """This process's ``service.name`` (see the module's docstring)."""
    role = role or _role
    env = os.environ
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    roles = env.get("NALAR_SERVICE_ROLE", "").strip()
    if name and (not roles or role in {r.strip() for r in roles.split(",")}):
        return name
    return f"nalar-{role}"


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

    attrs: dict[str, Any] = {"service.name": service_name(), "nalar.role": _role}
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


# -- semantic conventions -----------------------------------------------------------------------------
def call_attributes(actor: str, method: str, subject: str, meta: Any) -> dict[str, Any]:
    """A call span's attributes (both sides): messaging and RPC conventions, nalar's under ``nalar.``."""
    a: dict[str, Any] = {"messaging.system": "nats", "rpc.system": "nalar", "rpc.service": actor, "rpc.method": method,
                         "nalar.future_id": meta.id, "nalar.request_id": meta.request or meta.id,
                         "nalar.priority": meta.priority, "nalar.attempt": meta.attempt}
    if subject:
        a["messaging.destination.name"] = subject
    if meta.session is not None:
        a["nalar.session"] = meta.session
    if meta.parent:
        a["nalar.parent_id"] = meta.parent
    return a


def record_error(span: Any, type_: str, message: str, stacktrace: str = "", kind: str = "") -> None:
    """Status ERROR and an ``exception`` event (exception.type/message/stacktrace), as
    ``span.record_exception`` writes it, but for a remote error: its traceback is the remote one."""
    from opentelemetry.trace import Status, StatusCode

    attrs = {"exception.type": type_ or "Exception", "exception.message": message or ""}
    if stacktrace:
        attrs["exception.stacktrace"] = stacktrace
    if kind:
        attrs["nalar.error.kind"] = kind
    span.add_event("exception", attrs)
    span.set_attribute("error.type", type_ or "Exception")
    span.set_status(Status(StatusCode.ERROR, f"{type_}: {str(message)[:200]}"))


def record_exception(span: Any, err: BaseException) -> None:
    """``record_error`` for an exception this process holds (a ``RemoteError`` keeps its remote traceback)."""
    tb = getattr(err, "traceback", None)
    if not isinstance(tb, str) or not tb:
        import traceback

        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    rtype = getattr(err, "type", None)
    message = getattr(err, "message", None)
    record_error(span, rtype if isinstance(rtype, str) else type(err).__name__,
                 message if isinstance(message, str) else str(err), tb, getattr(err, "kind", "") or "")


class CallSpan:
    """A client call span, as a future holds it: ending it after a failure records the error event.

    (The future ends its span with ``set_status`` then ``end``; this adds the ``exception`` event with
    the remote traceback, read from the failed future, before the span closes.)
    """

    __slots__ = ("span", "fut")

    def __init__(self, span: Any, fut: Any) -> None:
        self.span = span
        self.fut = fut

    def set_status(self, status: Any) -> None:
        self.span.set_status(status)  # (record_error sets it again, with the type)

    def end(self) -> None:
        fut, self.fut = self.fut, None
        err = getattr(fut, "_value", None) if fut is not None else None
        if fut is not None and fut._state == 2 and isinstance(err, BaseException):  # FAILED
            record_exception(self.span, err)
        self.span.end()

    def get_span_context(self) -> Any:
        return self.span.get_span_context()

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)
