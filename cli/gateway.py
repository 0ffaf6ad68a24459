"""``nalar gateway``: the deployment over HTTP (Starlette on uvicorn, a well-kept ASGI stack).

``POST /v1/actors/{actor}/{method}`` calls any actor with JSON arguments (as ``nalar call`` reads
them: a list is the argument list, an object the keyword arguments, anything else the one argument);
``X-Session-Id``, ``X-Priority`` and ``X-Timeout`` (seconds) are the call's options, and the answer is
``{"result": ...}``. The OpenAI-compatible endpoints are in ``cli/gateway_openai.py``, the routes
and the command in ``cli/gateway_cmd.py``.

Errors map to the statuses HTTP clients expect (``status_of``), with the structured error as the body;
a request body over the bound is 413 before anything is sent; a client that disconnects before its
answer cancels the call, and through it every call it made. With an API key (``--api-key`` or
``$NALAR_GATEWAY_API_KEY``), every request needs ``Authorization: Bearer KEY``.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any, Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..actors.client import Client
from ..actors.runtime import check_timeout, default_timeout
from ..bus import envelope as env
from ..bus.errors import (BadRequest, BusError, Cancelled, DeadlineExceeded, Overloaded, PayloadTooLarge,
                          RemoteError, Unavailable, UnknownActor, UnknownMethod)

DEFAULT_MAX_BODY = 8 << 20

log = logging.getLogger("nalar.gateway")
RETRY_AFTER_S = "1"


class HTTPError(Exception):
    """An answer other than 200, raised where it is found: its status, message and extra headers."""

    def __init__(self, status: int, message: str, kind: str = "bad_request", *,
                 headers: dict[str, str] | None = None, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}
        self.error = error


class ClientGone(Exception):
    """The HTTP client disconnected before its answer: its call was cancelled."""


# -- errors ------------------------------------------------------------------------------------------
def status_of(e: BaseException) -> tuple[int, dict[str, str]]:
    """The HTTP status (and headers) for an error a call ended with."""
    if isinstance(e, PayloadTooLarge):
        return 413, {}
    if isinstance(e, (UnknownActor, UnknownMethod)):
        return 404, {}
    if isinstance(e, BadRequest):
        return 400, {}
    if isinstance(e, Overloaded):
        return 429, {"Retry-After": RETRY_AFTER_S}
    if isinstance(e, (Unavailable, Cancelled)):  # no executor could take it, or its node was stopping
        return 503, {"Retry-After": RETRY_AFTER_S}
    if isinstance(e, DeadlineExceeded):
        return 504, {}
    if isinstance(e, RemoteError):
        # the method itself refused its input (a model's bad sampling parameter, a prompt over
        # max_model_len): the caller's fault, as OpenAI's servers answer it
        return (400, {}) if e.kind == "error" and e.type == "ValueError" and not e.chain else (500, {})
    if isinstance(e, BusError):
        return 503, {"Retry-After": RETRY_AFTER_S}
    if isinstance(e, (ValueError, TypeError)):
        return 400, {}
    return 500, {}


def error_body(e: BaseException, status: int) -> dict[str, Any]:
    """``{"error": {...}}``: OpenAI's shape (``message``, ``type``, ``code``), and for a call's error its
    structured form (``kind``, ``type``, ``message``, ``actor``, ``method``, ``traceback``, ``chain``,
    ``future_id``), already scrubbed of host details by the node that sent it."""
    if isinstance(e, HTTPError):
        return {"error": {"message": e.message, "type": e.kind, "kind": e.kind, "code": status, "param": None,
                          **(e.error or {})}}
    if isinstance(e, RemoteError):
        d = e.to_wire()
        return {"error": {**d, "code": status, "param": None}}
    kind = "bad_request" if status == 400 else "payload_too_large" if status == 413 else \
        "unavailable" if status == 503 else "error"
    return {"error": {"message": str(e), "type": type(e).__name__, "kind": kind, "code": status, "param": None}}


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(env.dumps(value, None), status_code=status, headers=headers, media_type="application/json")


def error_response(e: BaseException) -> Response:
    if isinstance(e, HTTPError):
        status, headers = e.status, e.headers
    else:
        status, headers = status_of(e)
    return json_response(error_body(e, status), status, headers)


# -- requests ------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (from Content-Length, else while read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPError(413, f"the request body is {int(declared):,} bytes, over the gateway's limit of "
                                 f"{limit:,} bytes", "payload_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body is over the gateway's limit of {limit:,} bytes",
                            "payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, empty: Any = None) -> Any:
    if not body.strip():
        if empty is not None:
            return empty
        raise HTTPError(400, "the request body is empty: expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"the request body is not JSON ({e})") from None


def call_options(request: Request, session: str | None = None) -> dict[str, Any]:
    """``session``, ``priority`` and ``timeout`` from the headers (``session`` when the header is absent)."""
    h = request.headers
    opts: dict[str, Any] = {"session": h.get("x-session-id") or session}
    pr = h.get("x-priority")
    if pr is not None:
        try:
            opts["priority"] = int(pr)
        except ValueError:
            raise HTTPError(400, f"X-Priority must be an integer, not {pr!r}") from None
    t = h.get("x-timeout")
    try:
        opts["timeout"] = check_timeout(float(t)) if t is not None else default_timeout()
    except ValueError as e:
        raise HTTPError(400, f"X-Timeout: {e}" if t is not None else str(e)) from None
    return opts


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (its body read already, nothing else can come)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _result(fut: Any) -> Any:
    return await fut


async def await_call(request: Request, fut: Any) -> Any:
    """The call's result, or ``ClientGone`` (the call cancelled down its tree) if the client left first."""
    waiter = asyncio.ensure_future(_result(fut))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping, or the response task was cancelled
        fut.cancel()
        raise
    finally:
        gone.cancel()
    if waiter in done:
        return waiter.result()
    fut.cancel()
    waiter.cancel()
    raise ClientGone()


def failed(request: Request, status: int, e: BaseException | None) -> None:
    """One log line per failed request (``nalar.calls``, as a node's failed calls): the route, status, the
    call and its error, its request id (the gateway's call is the request's root) and trace id."""
    calls = logging.getLogger("nalar.calls")
    if not calls.isEnabledFor(logging.WARNING):
        return
    fields: dict[str, Any] = {"http_method": request.method, "http_path": request.url.path, "http_status": status,
                              "source": "gateway"}
    actor = request.path_params.get("actor")
    method = request.path_params.get("method")
    if isinstance(e, RemoteError):
        actor, method = e.actor or actor, e.method or method
        fields.update(error_kind=e.kind, error_type=e.type, error_message=str(e.message)[:500])
        if e.future_id:
            fields["request_id"] = fields["future_id"] = e.future_id
    elif e is not None:
        fields.update(error_kind=getattr(e, "kind", "bad_request"), error_type=type(e).__name__,
                      error_message=str(getattr(e, "message", e))[:500])
    else:
        fields.update(error_kind="client_gone", error_type="ClientGone", error_message="the client disconnected")
    if actor:
        fields.update(actor=actor, call=f"{actor}.{method or ''}")
        if method:
            fields["method"] = method
    session = request.headers.get("x-session-id")
    if session:
        fields["session"] = session[:256]
    tid = _trace_id()
    if tid:
        fields["trace_id"] = tid
    ids = " ".join(f"{k.split('_')[0]}={fields[k]}" for k in ("request_id", "trace_id") if k in fields)
    calls.warning("request failed: %s %s %d %s %s: %s%s", request.method, request.url.path, status,
                  fields["error_kind"], fields["error_type"], fields["error_message"], f" ({ids})" if ids else "",
                  extra={"nalar": fields})


def _trace_id() -> str:
    from ..bus import tracing

    if tracing.TRACER is None:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


# -- the app -------------------------------------------------------------------------------------------
class Gateway:
    """What every endpoint shares: the connection, the body bound, the API key and the model names."""

    def __init__(self, client: Client, *, api_key: str | None = None, max_body: int | None = None,
                 models: dict[str, str] | None = None) -> None:
        self.client = client
        self.api_key = api_key or None
        server_max = client.runtime.transport.max_payload or DEFAULT_MAX_BODY
        self.max_body = max_body if max_body is not None else min(DEFAULT_MAX_BODY, server_max)
        self.models = dict(models or {})  # OpenAI model name -> actor (besides the actors of kind model)
        self.no_stream: set[str] = set()  # actors found to have no streaming chat/generate: called whole

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def endpoint(self, fn: Callable[["Gateway", Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """``fn`` with the API key checked and every error answered as ``status_of`` says."""
        async def handle(request: Request) -> Response:
            if not self.authorized(request):
                return json_response(error_body(HTTPError(401, "a valid API key is required: "
                                                               "Authorization: Bearer KEY", "unauthorized"), 401),
                                     401, {"WWW-Authenticate": "Bearer"})
            try:
                return await fn(self, request)
            except ClientGone:
                failed(request, 499, None)
                return Response(status_code=499)  # nobody reads it
            except Exception as e:
                if not isinstance(e, (HTTPError, RemoteError, BusError, ValueError)):
                    log.exception("%s %s failed in the gateway", request.method, request.url.path)
                response = error_response(e)
                failed(request, response.status_code, e)
                return response
        return handle

    def stub(self, actor: str, opts: dict[str, Any]) -> Any:
        return self.client.stub(actor, **{k: v for k, v in opts.items() if v is not None})


async def call_actor(gw: Gateway, request: Request) -> Response:
    actor = request.path_params["actor"]
    method = request.path_params["method"]
    if method.startswith("_"):
        raise HTTPError(404, f"{actor} has no public method {method!r}", "unknown_method")
    opts = call_options(request)
    value = parse_json(await read_body(request, gw.max_body), empty=[])
    args, kwargs = (value, {}) if isinstance(value, list) else ([], value) if isinstance(value, dict) else ([value], {})
    fut = getattr(gw.stub(actor, opts), method)(*args, **kwargs)
    if "text/event-stream" in request.headers.get("accept", ""):
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        return StreamingResponse(_events(fut), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(fut.cancel))  # a client gone: the call cancelled
    return json_response({"result": await await_call(request, fut)})


async def _events(fut: Any) -> Any:
    """Server-Sent Events of a call: ``{"item": ...}`` for each item a streaming method yields, then
    ``{"result": ...}`` (a plain method: its value alone), or ``{"error": ...}`` if it failed."""
    try:
        try:
            async for item in fut:
                yield b"data: " + env.dumps({"item": item}, None) + b"\n\n"
        except TypeError:  # not a streaming method: its value is the one event
            if fut.exception(0) is not None:
                raise
        yield b"data: " + env.dumps({"result": await fut}, None) + b"\n\n"
    except Exception as e:
        yield b"data: " + env.dumps(error_body(e, status_of(e)[0]), None) + b"\n\n"
    finally:
        fut.cancel()
