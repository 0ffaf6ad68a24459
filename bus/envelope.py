"""The message envelope: orjson bodies, ids and trace context in NATS headers, validation at the edge.

A call carries headers ``Nalar-Id`` (the future id, required), ``Nalar-Deadline`` (absolute Unix time
in seconds), and when set ``Nalar-Req`` (root request id), ``Nalar-Session``, ``Nalar-Parent``,
``Nalar-Priority``, ``Nalar-Attempt`` and W3C ``traceparent``; its body is
``{"m": method, "a": [args...], "k": {kwargs...}}``. A reply carries ``Nalar-Id`` and a body of
``{"v": value}`` or ``{"e": {error}}``. Values are JSON; ``bytes`` travel as ``{"$bytes": base64}``
and come back as ``bytes``; dataclasses travel as objects and come back as dicts. Nothing is pickled
and nothing in a message is ever evaluated.
"""
from __future__ import annotations

import base64
import math
from typing import Any, Callable

import orjson

from .errors import MalformedMessage, PayloadTooLarge

H_ID = "Nalar-Id"
H_REQ = "Nalar-Req"
H_SESSION = "Nalar-Session"
H_PARENT = "Nalar-Parent"
H_DEADLINE = "Nalar-Deadline"
H_PRIORITY = "Nalar-Priority"
H_ATTEMPT = "Nalar-Attempt"
H_TRACEPARENT = "traceparent"

MAX_ID_LEN = 128
_BYTES_KEY = "$bytes"
_BYTES_MARK = b'"$bytes"'
_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {_BYTES_KEY: base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(
        f"a value of type {type(obj).__qualname__} cannot cross the bus: nalar sends JSON types, "
        "bytes and dataclasses only (never pickle)"
    )


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode a value; raises ``TypeError`` naming the offending type."""
    try:
        return orjson.dumps(obj, default=default or _default, option=_OPTS)
    except TypeError as e:
        cause = e.__cause__ if isinstance(e.__cause__, TypeError) else e
        raise TypeError(str(cause)) from None


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _BYTES_KEY in obj and isinstance(obj[_BYTES_KEY], str):
            return base64.b64decode(obj[_BYTES_KEY])
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwrap(v) for v in obj]
    return obj


def loads(data: bytes) -> Any:
    """Decode a value; walks the tree only when a ``$bytes`` marker is present."""
    obj = orjson.loads(data)
    if _BYTES_MARK in data:
        obj = _unwrap(obj)
    return obj


def check_size(data: bytes, limit: int, what: str) -> None:
    if limit and len(data) > limit:
        raise PayloadTooLarge(len(data), limit, what)


def encode_call(method: str, args: Any, kwargs: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    return dumps({"m": method, "a": args, "k": kwargs}, default)


def encode_result(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    return dumps({"v": value}, default)


def encode_error(err: dict[str, Any]) -> bytes:
    return orjson.dumps({"e": err}, default=str)


class CallMessage:
    """A validated incoming call. The node extends it with its own bookkeeping fields."""

    __slots__ = ("id", "request", "session", "parent", "deadline", "priority", "attempt",
                 "traceparent", "method", "args", "kwargs", "reply")

    id: str
    request: str
    session: str | None
    parent: str | None
    deadline: float
    priority: int
    attempt: int
    traceparent: str | None
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    reply: str


def _id_header(headers: dict[str, str] | None) -> str:
    if not headers:
        raise MalformedMessage("message has no headers (a nalar call carries Nalar-Id)")
    fid = headers.get(H_ID)
    if not fid or len(fid) > MAX_ID_LEN:
        raise MalformedMessage("message has no valid Nalar-Id header")
    return fid


def decode_call(data: bytes, headers: dict[str, str] | None, reply: str,
                cls: type[CallMessage] = CallMessage) -> CallMessage:
    """Validate and decode one call; raises ``MalformedMessage`` with the reason."""
    fid = _id_header(headers)
    assert headers is not None
    try:
        body = loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedMessage(f"call body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise MalformedMessage("call body must be a JSON object")
    method = body.get("m")
    args = body.get("a", [])
    kwargs = body.get("k", {})
    if not isinstance(method, str) or not method:
        raise MalformedMessage("call body has no method name 'm'")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise MalformedMessage("call body 'a' must be a list and 'k' an object")
    c = cls()
    c.id = fid
    c.request = headers.get(H_REQ) or fid
    c.session = headers.get(H_SESSION)
    c.parent = headers.get(H_PARENT)
    c.traceparent = headers.get(H_TRACEPARENT)
    try:
        d = headers.get(H_DEADLINE)
        c.deadline = float(d) if d else 0.0
        p = headers.get(H_PRIORITY)
        c.priority = int(p) if p else 0
        a = headers.get(H_ATTEMPT)
        c.attempt = int(a) if a else 0
    except ValueError:
        raise MalformedMessage("call has a non-numeric deadline, priority or attempt header") from None
    if not math.isfinite(c.deadline) or c.deadline < 0:
        raise MalformedMessage("call has a deadline that is not a finite Unix time")
    c.method = method
    c.args = args
    c.kwargs = kwargs
    c.reply = reply
    return c


def decode_reply(data: bytes) -> tuple[bool, Any]:
    """Return ``(True, value)`` or ``(False, error_dict)``; raises ``MalformedMessage``."""
    try:
        body = loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedMessage(f"reply body is not JSON: {e}") from None
    if isinstance(body, dict):
        if "v" in body:
            return True, body["v"]
        err = body.get("e")
        if isinstance(err, dict):
            return False, err
    raise MalformedMessage("reply body must be {'v': value} or {'e': error}")


def decode_json_object(data: bytes, what: str) -> dict[str, Any]:
    """For control messages: a JSON object or ``MalformedMessage``."""
    try:
        body = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError as e:
        raise MalformedMessage(f"{what} body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise MalformedMessage(f"{what} body must be a JSON object")
    return body
