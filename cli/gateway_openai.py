"""The gateway's OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A request's ``model`` names a model actor (an ``LLM`` subclass): by ``--model NAME=ACTOR``, else the
actor of that name. ``/v1/models`` lists the ``--model`` names and every actor whose kind is ``model``
in the nodes' status (a client credential under authentication may not ask for status: then only the
``--model`` names). The session is ``X-Session-Id``, else the request's ``user``, so a conversation's
turns keep their instance (its prefix cache) and their state.

Streaming (``"stream": true``) is Server-Sent Events in OpenAI's chunk format, token by token: the
gateway calls the model actor's streaming method (``chat_stream`` / ``generate_stream``) and sends each
piece as the engine makes it. An actor without one (an agent that speaks ``chat``) is called whole and
its text sent in chunks once done. A client that disconnects mid-stream cancels the call, and the
engine's request with it.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

import orjson
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ..bus.errors import BusError, UnknownMethod
from .gateway import ClientGone, Gateway, HTTPError, await_call, call_options, error_body, \
    disconnected, json_response, parse_json, read_body, status_of

#: OpenAI request fields passed to the model actor's sampling parameters (OpenAI name -> nalar's).
SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}
STREAM_CHUNK_CHARS = 16
#: How long a streamed request waits for its first piece before it sends its headers: an error that
#: comes at once still gets its own status.
FIRST_WAIT_S = 1.0
MODELS_TTL_S = 5.0


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    n = body.get("n", 1)
    if n not in (None, 1):
        raise HTTPError(400, f"n={n!r}: only one choice per request is supported")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise HTTPError(400, f"'stream_options' must be an object, e.g. {{\"include_usage\": true}}, not {so!r:.80}")
    out = {ours: body[theirs] for theirs, ours in SAMPLING.items() if body.get(theirs) is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


def _request(body: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "'model' is required: the name of a model (GET /v1/models lists them)")
    return model, body


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI's content parts (``[{"type": "text", "text": ...}]``) as the one string nalar's chat takes."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                raise HTTPError(400, "only text content parts are supported")
            m = {**m, "content": "".join(str(p.get("text", "")) for p in parts)}
        out.append({"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m)
    return out


def _user(body: dict[str, Any]) -> str | None:
    u = body.get("user")
    return u if isinstance(u, str) and u else None


def _usage(r: dict[str, Any]) -> dict[str, Any]:
    p, c = int(r.get("prompt_tokens", 0)), int(r.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(r.get("cached_tokens", 0))}}


class _Call:
    """One completion request's call: ``method`` (chat or generate) on the model's actor, or its
    streaming form, and how to make it again whole if the actor cannot stream."""

    def __init__(self, gw: Gateway, request: Request, method: str, value: Any, body: dict[str, Any],
                 model: str) -> None:
        self.gw, self.method, self.value, self.model = gw, method, value, model
        self.opts = call_options(request, _user(body))
        self.sampling = _sampling(body)
        self.actor = gw.models.get(model, model)
        self.streaming = bool(body.get("stream")) and self.actor not in gw.no_stream

    def start(self) -> Any:
        method = self.method + "_stream" if self.streaming else self.method
        return getattr(self.gw.stub(self.actor, self.opts), method)(self.value, **self.sampling)

    def whole(self) -> Any:
        """The actor has no streaming method: remember it, and call it whole."""
        self.gw.no_stream.add(self.actor)
        self.streaming = False
        return self.start()


def _not_a_model(e: BaseException, model: str) -> BaseException:
    from ..bus.errors import UnknownActor, UnknownMethod

    if isinstance(e, (UnknownActor, UnknownMethod)):
        return HTTPError(404, f"the model {model!r} does not exist: no model actor serves it (GET /v1/models "
                              f"lists them)", "model_not_found", error={"cause": str(e.message)})
    return e


async def chat_completions(gw: Gateway, request: Request) -> Response:
    model, body = _request(parse_json(await read_body(request, gw.max_body)))
    call = _Call(gw, request, "chat", _messages(body.get("messages")), body, model)
    return await _answer(request, call, body, model, chat=True)


async def completions(gw: Gateway, request: Request) -> Response:
    model, body = _request(parse_json(await read_body(request, gw.max_body)))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise HTTPError(400, "'prompt' must be a string (or a list of one string)")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "'prompt' must be a string")
    call = _Call(gw, request, "generate", prompt, body, model)
    return await _answer(request, call, body, model, chat=False)


def _choice(r: dict[str, Any], chat: bool) -> dict[str, Any]:
    fr = r.get("finish_reason") or "stop"
    if chat:
        return {"index": 0, "message": {"role": "assistant", "content": r.get("text", "")}, "finish_reason": fr,
                "logprobs": None}
    return {"index": 0, "text": r.get("text", ""), "finish_reason": fr, "logprobs": None}


def _ids(chat: bool) -> tuple[str, str, int]:
    return (("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "chat.completion" if chat else "text_completion",
            int(time.time()))


async def _answer(request: Request, call: _Call, body: dict[str, Any], model: str, *, chat: bool) -> Response:
    gw = call.gw
    if body.get("stream"):
        # The first piece, or an error, before the 200 if it comes soon: an unknown model is a 404 and a
        # refused parameter a 400, as OpenAI's are. A slow start (a long prefill, an agent's first
        # steps) gets its headers and the role event after FIRST_WAIT_S, and the piece when it comes.
        calls: list[Any] = []
        pieces = _pieces(call, calls)
        # An actor no live node serves waits for its answer (a 404 once the runtime has looked).
        wait = FIRST_WAIT_S if gw.client.runtime.serving(call.actor) else None
        try:
            first = await _first(request, pieces, wait)
        except BaseException as e:
            _cancel(calls)
            if isinstance(e, (ClientGone, asyncio.CancelledError)):
                raise
            raise _not_a_model(e, model) from None
        return StreamingResponse(_stream(first, pieces, calls, body, model, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_cancel, calls))  # also if the body never started
    fut = call.start()
    try:
        r = await await_call(request, fut)
    except ClientGone:
        raise
    except Exception as e:
        raise _not_a_model(e, model) from None
    cid, obj, created = _ids(chat)
    out = {"id": cid, "object": obj, "created": created, "model": model, "choices": [_choice(r, chat)],
           "usage": _usage(r), "system_fingerprint": str(r.get("engine", "")), "nalar": _extra(r)}
    return json_response(out)


def _extra(r: dict[str, Any]) -> dict[str, Any]:
    """nalar's own fields of a completion (OpenAI clients keep unknown fields): which instance and engine
    served it, and its timings."""
    return {k: r[k] for k in ("instance", "engine", "cached_tokens", "ttft_ms", "latency_ms") if k in r}


def _sse(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


async def _pieces(call: _Call, calls: list[Any]) -> AsyncIterator[str | dict[str, Any]]:
    """The text as it comes, then the completion's dict; each call made is put in ``calls`` at once
    (for the caller to cancel). An actor without a streaming method is called whole, and its text cut
    into pieces."""
    fut = call.start()
    calls.append(fut)
    if call.streaming:
        try:
            done = False
            async for item in fut:
                if isinstance(item, (str, dict)):
                    done = done or isinstance(item, dict)
                    yield item
            if not done:  # a stream that ended without its completion (or yielded nothing at all)
                yield {}
            return
        except UnknownMethod:
            fut = call.whole()
            calls.append(fut)
    r = await fut
    text = str(r.get("text", "")) if isinstance(r, dict) else ""
    for i in range(0, len(text), STREAM_CHUNK_CHARS):
        yield text[i:i + STREAM_CHUNK_CHARS]
    yield r if isinstance(r, dict) else {}


def _cancel(calls: list[Any]) -> None:
    for fut in calls:
        fut.cancel()  # a no-op once it is done; a client gone mid-stream cancels the engine's request


async def _first(request: Request, pieces: AsyncIterator[str | dict[str, Any]],
                 wait: float | None) -> "asyncio.Future[Any]":
    """The task reading the stream's first piece, done if it came (or failed) within ``wait`` seconds;
    ``ClientGone`` if the client left first."""
    first: asyncio.Future[Any] = asyncio.ensure_future(pieces.__anext__())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({first, gone}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        first.cancel()
        raise
    finally:
        gone.cancel()
    if first.done():
        first.result()  # its error, if it failed: answered with its own status
    elif gone.done() and not gone.cancelled():
        first.cancel()
        raise ClientGone()
    return first


async def _stream(first: "asyncio.Future[Any]", pieces: AsyncIterator[str | dict[str, Any]], calls: list[Any],
                  body: dict[str, Any], model: str, chat: bool) -> AsyncIterator[bytes]:
    """The SSE events of one streamed completion, from its first piece on. Starlette cancels this
    generator when the client disconnects: the ``finally`` then cancels the call, and through it the
    engine's request."""
    cid, _, created = _ids(chat)
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {} if delta is None else \
                {"content": delta}
            ch: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            ch = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {"id": cid, "object": obj, "created": created, "model": model, "choices": [ch]}

    try:
        if chat:
            yield _sse(chunk(None, role=True))
        r: dict[str, Any] = {}
        try:
            piece = await first
            if isinstance(piece, str):
                yield _sse(chunk(piece))
            else:
                r = piece
            async for piece in pieces:
                if isinstance(piece, str):
                    yield _sse(chunk(piece))
                else:
                    r = piece
        except Exception as e:  # the stream has started (200): the error is its last event, as OpenAI's is
            err = _not_a_model(e, model)
            status = err.status if isinstance(err, HTTPError) else status_of(err)[0]
            yield _sse(error_body(err, status))
            yield b"data: [DONE]\n\n"
            return
        last = chunk(None, r.get("finish_reason") or "stop")
        last["nalar"] = _extra(r)
        yield _sse(last)
        if want_usage:
            yield _sse({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": _usage(r)})
        yield b"data: [DONE]\n\n"
    finally:
        first.cancel()
        _cancel(calls)


class _ModelList:
    """The actors of kind ``model`` the nodes report, asked at most every ``MODELS_TTL_S``."""

    def __init__(self) -> None:
        self.at = -MODELS_TTL_S
        self.names: list[str] = []

    async def get(self, gw: Gateway) -> list[str]:
        if time.monotonic() - self.at >= MODELS_TTL_S:
            try:
                nodes = await gw.client.status_async(1.0)
            except BusError:  # a client credential may not ask for status: the --model names only
                nodes = []
            self.names = sorted({name for n in nodes for name, a in (n.get("actors") or {}).items()
                                 if isinstance(a, dict) and a.get("kind") == "model"})
            self.at = time.monotonic()
        return self.names


_MODELS = _ModelList()


async def list_models(gw: Gateway, request: Request) -> Response:
    names = dict.fromkeys([*gw.models, *await _MODELS.get(gw)])
    return json_response({"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "nalar", "actor": gw.models.get(n, n)}
        for n in names]})
