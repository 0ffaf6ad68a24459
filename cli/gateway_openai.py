"""The gateway's OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A request's ``model`` names a model actor (an ``LLM`` subclass): by ``--model NAME=ACTOR``, else the
actor of that name. ``/v1/models`` lists the ``--model`` names and every actor whose kind is ``model``
in the nodes' status (a client credential under authentication may not ask for status: then only the
``--model`` names). The session is ``X-Session-Id``, else the request's ``user``, so a conversation's
turns keep their instance (its prefix cache) and their state.

Streaming (``"stream": true``) is Server-Sent Events in OpenAI's chunk format, but the model actors
return whole completions (no token streaming yet): the stream starts at once with the role, and the
text arrives in chunks when the completion is done, then ``[DONE]``. A client that disconnects before
then cancels the call, and the engine's request with it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..bus.errors import BusError
from .gateway import ClientGone, Gateway, HTTPError, await_call, call_options, error_body, json_response, \
    parse_json, read_body, status_of

#: OpenAI request fields passed to the model actor's sampling parameters (OpenAI name -> nalar's).
SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}
STREAM_CHUNK_CHARS = 16
MODELS_TTL_S = 5.0


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    n = body.get("n", 1)
    if n not in (None, 1):
        raise HTTPError(400, f"n={n!r}: only one choice per request is supported")
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


async def _complete(gw: Gateway, request: Request, method: str, what: str, value: Any,
                    body: dict[str, Any], model: str) -> tuple[Any, dict[str, Any]]:
    """(the call's future, its options): ``method`` (chat or generate) on ``model``'s actor."""
    opts = call_options(request, _user(body))
    actor = gw.models.get(model, model)
    fut = getattr(gw.stub(actor, opts), method)(value, **_sampling(body))
    return fut, opts


def _not_a_model(e: BaseException, model: str) -> BaseException:
    from ..bus.errors import UnknownActor, UnknownMethod

    if isinstance(e, (UnknownActor, UnknownMethod)):
        return HTTPError(404, f"the model {model!r} does not exist: no model actor serves it (GET /v1/models "
                              f"lists them)", "model_not_found", error={"cause": str(e.message)})
    return e


async def chat_completions(gw: Gateway, request: Request) -> Response:
    model, body = _request(parse_json(await read_body(request, gw.max_body)))
    fut, _ = await _complete(gw, request, "chat", "messages", _messages(body.get("messages")), body, model)
    return await _answer(request, fut, body, model, chat=True)


async def completions(gw: Gateway, request: Request) -> Response:
    model, body = _request(parse_json(await read_body(request, gw.max_body)))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise HTTPError(400, "'prompt' must be a string (or a list of one string)")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "'prompt' must be a string")
    fut, _ = await _complete(gw, request, "generate", "prompt", prompt, body, model)
    return await _answer(request, fut, body, model, chat=False)


def _choice(r: dict[str, Any], chat: bool) -> dict[str, Any]:
    fr = r.get("finish_reason") or "stop"
    if chat:
        return {"index": 0, "message": {"role": "assistant", "content": r.get("text", "")}, "finish_reason": fr,
                "logprobs": None}
    return {"index": 0, "text": r.get("text", ""), "finish_reason": fr, "logprobs": None}


def _ids(chat: bool) -> tuple[str, str, int]:
    return (("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "chat.completion" if chat else "text_completion",
            int(time.time()))


async def _answer(request: Request, fut: Any, body: dict[str, Any], model: str, *, chat: bool) -> Response:
    if body.get("stream"):
        return StreamingResponse(_stream(request, fut, body, model, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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


async def _stream(request: Request, fut: Any, body: dict[str, Any], model: str, chat: bool) -> AsyncIterator[bytes]:
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
        try:
            r = await await_call(request, fut)
        except ClientGone:
            return
        except Exception as e:  # the stream has started (200): the error is its last event, as OpenAI's is
            err = _not_a_model(e, model)
            status = err.status if isinstance(err, HTTPError) else status_of(err)[0]
            yield _sse(error_body(err, status))
            yield b"data: [DONE]\n\n"
            return
        text = str(r.get("text", ""))
        for i in range(0, len(text), STREAM_CHUNK_CHARS):
            yield _sse(chunk(text[i:i + STREAM_CHUNK_CHARS]))
        last = chunk(None, r.get("finish_reason") or "stop")
        last["nalar"] = _extra(r)
        yield _sse(last)
        if want_usage:
            yield _sse({"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": _usage(r)})
        yield b"data: [DONE]\n\n"
    finally:
        fut.cancel()  # a no-op once it is done; a client gone mid-stream cancels the engine's request


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
