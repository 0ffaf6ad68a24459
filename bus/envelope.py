"""The message envelope: orjson bodies, ids and trace context in NATS headers, validation at the edge.

A call carries headers ``Nalar-Id`` (the future id, required), ``Nalar-Deadline`` (absolute Unix time
in seconds), and when set ``Nalar-Req`` (root request id), ``Nalar-Session``, ``Nalar-Parent``,
``Nalar-Priority``, ``Nalar-Attempt`` and W3C ``traceparent``; its body is
``{"m": method, "a": [args...], "k": {kwargs...}}``. A reply carries ``Nalar-Id`` and a body of
``{"v": value}`` or ``{"e": {error}}``. Values are JSON; ``bytes`` travel as ``{"$bytes": base64}``
and come back as ``bytes`` (a body holding them says so with ``"b": count``, so a user's own
``$bytes`` key is left alone); dataclasses travel as objects and come back as dicts. Nothing is pickled
and nothing in a message is ever evaluated.
"""
from __future__ import annotations

import base64
import math
from typing import Any, Callable, TypeVar

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
H_STAGE = "Nalar-Stage"  # how many calls its request made before it (SRTF-like policies)
H_FWD = "Nalar-Fwd"  # the node that forwarded it (a call is forwarded at most once)
H_BORN = "Nalar-Born"  # when its request (the root call) started, Unix µs: queues serve older requests first

MAX_ID_LEN = 128
MAX_SESSION_LEN = 256
_BYTES_KEY = "$bytes"
_BYTES_MARK = b'"$bytes"'
_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _not_json(obj: Any) -> TypeError:
    return TypeError(
        f"a value of type {type(obj).__qualname__} cannot cross the bus: nalar sends JSON types, "
        "bytes and dataclasses only (never pickle)"
    )


class Encoder:
    """orjson's ``default`` hook: bytes become ``{"$bytes": base64}`` and are counted.

    The count lets the codec mark a body that holds bytes, so a user's own dict that happens to use
    the key ``$bytes`` is never mistaken for bytes on the way back. Subclasses handle more types.
    """

    __slots__ = ("n_bytes",)

    def __init__(self) -> None:
        self.n_bytes = 0

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            self.n_bytes += 1
            return {_BYTES_KEY: base64.b64encode(bytes(obj)).decode("ascii")}
        raise _not_json(obj)


def _default(obj: Any) -> Any:
    """A ``default`` for values that may not hold bytes (status, control)."""
    raise _not_json(obj)


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode a value; raises ``TypeError`` naming the offending type."""
    try:
        return orjson.dumps(obj, default=default or Encoder(), option=_OPTS)
    except TypeError as e:
        cause = e.__cause__ if isinstance(e.__cause__, TypeError) else e
        raise TypeError(str(cause)) from None


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _BYTES_KEY in obj and isinstance(obj[_BYTES_KEY], str):
            return base64.b64decode(obj[_BYTES_KEY], validate=True)
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwrap(v) for v in obj]
    return obj


def unwrap_bytes(obj: Any, what: str) -> Any:
    """Turn ``$bytes`` objects back into bytes; bad base64 or absurd nesting is ``MalformedMessage``."""
    try:
        return _unwrap(obj)
    except (ValueError, RecursionError) as e:
        raise MalformedMessage(f"{what} holds an invalid $bytes value: {type(e).__name__}") from None


def _tagged(body: dict[str, Any], enc: Encoder) -> bytes:
    """Encode a body; ``"b": n`` tells the decoder how many bytes values to restore."""
    data = dumps(body, enc)
    if enc.n_bytes:
        if data.count(_BYTES_MARK) != enc.n_bytes:
            raise TypeError("a dict whose only key is '$bytes' cannot be sent together with bytes values "
                            "(the key is reserved for them)")
        data = data[:-1] + b',"b":' + str(enc.n_bytes).encode() + b"}"
    return data


def loads(data: bytes) -> Any:
    """Decode a JSON value (no bytes restored: see ``unwrap_bytes``)."""
    return orjson.loads(data)


def header_size(headers: dict[str, str] | None) -> int:
    """Bytes the server counts for headers (it checks headers + body against ``max_payload``)."""
    if not headers:
        return 0
    return 12 + 4 * len(headers) + sum(map(len, headers)) + sum(map(len, headers.values()))


#: nalar's own headers stay under this (ids <= 128 chars, sessions <= 256): exact counting is only
#: needed for bodies this close to the limit.
HEADER_ALLOWANCE = 2048


def check_size(data: bytes, headers: dict[str, str] | None, limit: int, what: str) -> None:
    """Raise ``PayloadTooLarge`` before the server would refuse (and drop our connection)."""
    if limit and len(data) + HEADER_ALLOWANCE > limit:
        size = len(data) + header_size(headers)
        if size > limit:
            raise PayloadTooLarge(size, limit, what)


def encode_call(method: str, args: Any, kwargs: Any, enc: Encoder | None = None) -> bytes:
    return _tagged({"m": method, "a": args, "k": kwargs}, enc or Encoder())


def encode_result(value: Any) -> bytes:
    return _tagged({"v": value}, Encoder())


#: Error messages and tracebacks are cut to this many characters so an error always fits a message.
MAX_ERROR_TEXT = 16_384


def encode_error(err: dict[str, Any]) -> bytes:
    for key in ("message", "traceback"):
        v = err.get(key)
        if isinstance(v, str) and len(v) > MAX_ERROR_TEXT:
            err[key] = v[:MAX_ERROR_TEXT // 2] + f"\n... [{len(v) - MAX_ERROR_TEXT} characters cut] ...\n" + v[-MAX_ERROR_TEXT // 2:]
    chain = err.get("chain")
    if isinstance(chain, list) and len(chain) > 16:
        err["chain"] = chain[:16]
    return orjson.dumps({"e": err}, default=str)


class CallMessage:
    """A validated incoming call. The node extends it with its own bookkeeping fields."""

    __slots__ = ("id", "request", "session", "parent", "deadline", "priority", "attempt",
                 "traceparent", "method", "args", "kwargs", "reply", "stage", "fwd", "born")

    id: str
    request: str
    session: str | None
    parent: str | None
    deadline: float
    priority: int
    attempt: int
    stage: int
    born: int
    fwd: str | None
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


C = TypeVar("C", bound=CallMessage)


def decode_call(data: bytes, headers: dict[str, str] | None, reply: str, cls: type[C]) -> C:
    """Validate and decode one call; raises ``MalformedMessage`` with the reason."""
    fid = _id_header(headers)
    assert headers is not None
    try:
        body = orjson.loads(data)
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
    if body.get("b"):
        args = unwrap_bytes(args, "call")
        kwargs = unwrap_bytes(kwargs, "call")
    c = cls()
    c.id = fid
    c.request = headers.get(H_REQ) or fid
    c.session = headers.get(H_SESSION)
    c.parent = headers.get(H_PARENT)
    c.traceparent = headers.get(H_TRACEPARENT)
    c.fwd = headers.get(H_FWD)
    try:
        d = headers.get(H_DEADLINE)
        c.deadline = float(d) if d else 0.0
        p = headers.get(H_PRIORITY)
        c.priority = int(p) if p else 0
        a = headers.get(H_ATTEMPT)
        c.attempt = int(a) if a else -1  # -1: the caller does not retry (so it wants no acks)
        st = headers.get(H_STAGE)
        c.stage = int(st) if st else 0
        b = headers.get(H_BORN)
        c.born = int(b) if b else 0
    except ValueError:
        raise MalformedMessage("call has a non-numeric deadline, priority, attempt, stage or born header") from None
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
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MalformedMessage(f"reply body is not JSON: {e}") from None
    if isinstance(body, dict):
        if "v" in body:
            return True, unwrap_bytes(body["v"], "reply") if body.get("b") else body["v"]
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
