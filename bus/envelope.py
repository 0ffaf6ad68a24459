"""The message envelope: orjson bodies, ids and trace context in NATS headers, validation at the edge.

A call carries headers ``Nalar-Id`` (the future id, required), ``Nalar-Deadline`` (absolute Unix time
in seconds), and when set ``Nalar-Req`` (root request id), ``Nalar-Session``, ``Nalar-Parent``,
``Nalar-Priority``, ``Nalar-Attempt``, ``Nalar-Stage``, ``Nalar-Born``, ``Nalar-Fwd`` and W3C
``traceparent``: ``CallMeta`` is that schema, written and read in one place. Its body is
``{"m": method, "a": [args...], "k": {kwargs...}}``. A reply carries ``Nalar-Id`` and a body of
``{"v": value}`` or ``{"e": {error}}``. Values are JSON; ``bytes`` travel as ``{"$bytes": base64}``
and come back as ``bytes`` (a body holding them says so with ``"b": count``, so a user's own
``$bytes`` key is left alone); dataclasses travel as objects and come back as dicts. Nothing is pickled
and nothing in a message is ever evaluated. ``fits``/``check_size`` are the one payload-size rule.
"""
from __future__ import annotations


import base64
import math
import re
from typing import Any, Callable, TypeVar, overload

import orjson

from .errors import MalformedMessage, PayloadTooLarge, scrub

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
H_CHUNK = "Nalar-Chunk"  # on a reply: one item of a streaming call, and its place (0, 1, ...) in the stream
H_STREAM = "Nalar-Stream"  # on a streaming call's last reply (its value: how many items it sent)
#: On a call: the service its program (request) had received when it was sent, along its critical path,
#: µs. On a reply: the service the call's own subtree received. Program-level scheduling (``order``).
H_SVC = "Nalar-Svc"
#: A Nalar-Svc above this (about 31 years in µs) is malformed.
MAX_SVC = 1 << 50

MAX_ID_LEN = 128
MAX_SESSION_LEN = 256
#: Control characters (C0, DEL, C1), which no session id may hold: ids are shown on operators'
#: terminals (``nalar top``, logs), where they could carry escape sequences.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
MAX_TRACEPARENT_LEN = 128  # W3C's is 55 characters; room for future versions
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
    return _close(data[:-1], enc.n_bytes) if enc.n_bytes else data


def _close(head: bytes, n_bytes: int) -> bytes:
    """Close a body (``head`` is it without its final brace), tagged with its ``n_bytes`` bytes values."""
    if not n_bytes:
        return head + b"}"
    if head.count(_BYTES_MARK) != n_bytes:
        raise TypeError("a dict whose only key is '$bytes' cannot be sent together with bytes values "
                        "(the key is reserved for them)")
    return head + b',"b":%d}' % n_bytes


def loads(data: bytes) -> Any:
    """Decode a JSON value (no bytes restored: see ``unwrap_bytes``)."""
    return orjson.loads(data)


def header_size(headers: dict[str, str] | None) -> int:
    """Bytes the server counts for headers (it checks headers + body against ``max_payload``)."""
    if not headers:
        return 0
    return 12 + 4 * len(headers) + sum(map(len, headers)) + sum(map(len, headers.values()))


#: nalar's own headers stay under this (ids <= 128 chars, sessions <= 256): exact counting is only
#: needed for bodies this close to the limit, and a body sent without headers of its own (a chunk of
#: a state transfer) leaves this much room for them.
HEADER_ALLOWANCE = 2048


def fits(data: bytes, headers: dict[str, str] | None, limit: int) -> bool:
    """Whether body and headers fit ``limit`` (0: no limit), as the server counts them."""
    return not limit or len(data) + HEADER_ALLOWANCE <= limit or len(data) + header_size(headers) <= limit


def check_size(data: bytes, headers: dict[str, str] | None, limit: int, what: str) -> None:
    """Raise ``PayloadTooLarge`` before the server would refuse (and drop our connection)."""
    if not fits(data, headers, limit):
        raise PayloadTooLarge(len(data) + header_size(headers), limit, what)


def encode_call(method: str, args: Any, kwargs: Any, enc: Encoder | None = None) -> bytes:
    return _tagged({"m": method, "a": args, "k": kwargs}, enc or Encoder())


class Template:
    """An encoded body with placeholders where values are still to come (futures passed as arguments).

    The body is encoded once; ``fill`` splices each value's encoding in place of its placeholder and
    recounts the ``"b"`` tag, so the rest of the body is never encoded again.
    """

    __slots__ = ("head", "n_bytes")

    def __init__(self, data: bytes, n_bytes: int) -> None:
        #: the body without its ``"b"`` tag and closing brace (a fresh, exact-size copy)
        self.head = data[:-len(b',"b":%d}' % n_bytes)] if n_bytes else data[:-1]
        #: bytes values in ``head``
        self.n_bytes = n_bytes

    def fill(self, values: list[tuple[bytes, Any]]) -> bytes:
        """The body with each ``(encoded placeholder, value)`` spliced in; ``TypeError`` as ``encode_call``."""
        data, n = self.head, self.n_bytes
        for mark, value in values:
            enc = Encoder()
            part = dumps(value, enc)
            if enc.n_bytes:
                n += enc.n_bytes * data.count(mark)
            data = data.replace(mark, part)
        return _close(data, n)


def encode_result(value: Any) -> bytes:
    return _tagged({"v": value}, Encoder())


#: Error messages and tracebacks are cut to this many characters so an error always fits a message.
MAX_ERROR_TEXT = 16_384
#: Errors of nested calls an error carries (``chain``), at most.
MAX_CHAIN = 16


def _cut(v: str) -> str:
    if len(v) <= MAX_ERROR_TEXT:
        return v
    return v[:MAX_ERROR_TEXT // 2] + f"\n... [{len(v) - MAX_ERROR_TEXT} characters cut] ...\n" + v[-MAX_ERROR_TEXT // 2:]


def encode_error(err: dict[str, Any]) -> bytes:
    """An error reply's body. Every error leaves a process through here, so this is where its texts
    lose host details (``errors.scrub``; the chain's too, whoever wrote them) and are cut to size.
    ``err`` is updated in place, so what a span records of it is what was sent."""
    for key in ("message", "traceback"):
        v = err.get(key)
        if isinstance(v, str):
            err[key] = _cut(scrub(v))
    chain = err.get("chain")
    if isinstance(chain, list) and chain:
        err["chain"] = [{**d, **{k: scrub(d[k]) for k in ("message", "traceback") if isinstance(d.get(k), str)}}
                        if isinstance(d, dict) else d for d in chain[:MAX_CHAIN]]
    return orjson.dumps({"e": err}, default=str)


class CallMeta:
    """What a call's headers carry: written by the caller's runtime, read (and forwarded) by nodes."""

    __slots__ = ("id", "request", "session", "parent", "deadline", "priority", "attempt", "stage", "born",
                 "fwd", "traceparent", "svc")

    id: str
    """The future id (``Nalar-Id``): a retry keeps it, so the executor answers it once."""
    request: str
    """The root call's id (``Nalar-Req``): every call of one request shares it; the id for a root."""
    session: str | None
    """The session the call belongs to (``Nalar-Session``): its state, its route, its turn."""
    parent: str | None
    """The id of the call that made this one (``Nalar-Parent``), ``None`` for a root."""
    deadline: float
    """Absolute Unix time when the call must be done (``Nalar-Deadline``); 0.0: not set."""
    priority: int
    """Higher runs first in queues (``Nalar-Priority``)."""
    attempt: int
    """Which attempt this is (``Nalar-Attempt``); -1: the caller does not retry, so it wants no acks."""
    stage: int
    """How many calls its request made before it (``Nalar-Stage``): for SRTF-like policies."""
    born: int
    """When its request started, Unix µs (``Nalar-Born``): queues serve older requests first."""
    fwd: str | None
    """The node that forwarded it (``Nalar-Fwd``): a call is forwarded at most once."""
    traceparent: str | None
    """W3C trace context of the caller's span (``traceparent``)."""
    svc: int
    """The service its program had received when it was sent, µs (``Nalar-Svc``; 0: none, or not
    measured): queues under an ``order`` decision serve the least-served programs first."""

    def __init__(self, id: str, request: str = "", session: str | None = None, parent: str | None = None,
                 deadline: float = 0.0, priority: int = 0, attempt: int = -1, stage: int = 0, born: int = 0,
                 fwd: str | None = None, traceparent: str | None = None, svc: int = 0) -> None:
        self.id = id
        self.request = request
        self.session = session
        self.parent = parent
        self.deadline = deadline
        self.priority = priority
        self.attempt = attempt
        self.stage = stage
        self.born = born
        self.fwd = fwd
        self.traceparent = traceparent
        self.svc = svc

    def to_headers(self) -> dict[str, str]:
        """The headers, leaving out fields at their defaults (``from_headers`` restores them)."""
        fid = self.id
        h = {H_ID: fid}
        v = self.request
        if v and v != fid:
            h[H_REQ] = v
        if self.parent is not None:
            h[H_PARENT] = self.parent
        if self.stage:
            h[H_STAGE] = str(self.stage)
        if self.born:
            h[H_BORN] = str(self.born)
        if self.deadline:
            h[H_DEADLINE] = f"{self.deadline:.3f}"
        if self.session is not None:
            h[H_SESSION] = self.session
        if self.priority:
            h[H_PRIORITY] = str(self.priority)
        if self.attempt >= 0:
            h[H_ATTEMPT] = str(self.attempt)
        if self.fwd is not None:
            h[H_FWD] = self.fwd
        if self.traceparent is not None:
            h[H_TRACEPARENT] = self.traceparent
        if self.svc:
            h[H_SVC] = str(self.svc)
        return h

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> "CallMeta":
        """Validate and read a call's headers; raises ``MalformedMessage`` with the reason."""
        fid = _id_header(headers)
        assert headers is not None
        try:
            d = headers.get(H_DEADLINE)
            deadline = float(d) if d else 0.0
            p = headers.get(H_PRIORITY)
            a = headers.get(H_ATTEMPT)
            st = headers.get(H_STAGE)
            b = headers.get(H_BORN)
            m = cls(fid, headers.get(H_REQ) or fid, headers.get(H_SESSION), headers.get(H_PARENT), deadline,
                    int(p) if p else 0, int(a) if a else -1, int(st) if st else 0, int(b) if b else 0,
                    headers.get(H_FWD), headers.get(H_TRACEPARENT))
            sv = headers.get(H_SVC)
            if sv:
                m.svc = parse_svc(sv)
        except ValueError:
            raise MalformedMessage("call has a non-numeric deadline, priority, attempt, stage, born or svc "
                                   "header, or a Nalar-Svc out of range") from None
        if not math.isfinite(deadline) or deadline < 0:
            raise MalformedMessage("call has a deadline that is not a finite Unix time")
        if (len(m.request) > MAX_ID_LEN or (m.parent is not None and len(m.parent) > MAX_ID_LEN)
                or (m.fwd is not None and len(m.fwd) > MAX_ID_LEN)
                or (m.session is not None and len(m.session) > MAX_SESSION_LEN)
                or (m.traceparent is not None and len(m.traceparent) > MAX_TRACEPARENT_LEN)):
            # bounded, so that every header a node sends on stays within HEADER_ALLOWANCE
            raise MalformedMessage(f"call has a Nalar-Req, Nalar-Parent or Nalar-Fwd over {MAX_ID_LEN} characters, "
                                   f"a Nalar-Session over {MAX_SESSION_LEN} or a traceparent over "
                                   f"{MAX_TRACEPARENT_LEN}")
        if m.session is not None and CONTROL_CHARS.search(m.session):
            raise MalformedMessage("call has a Nalar-Session with a control character in it")
        return m


def parse_svc(raw: str) -> int:
    """A ``Nalar-Svc`` value: µs, 0 to ``MAX_SVC``; ``ValueError`` otherwise."""
    if len(raw) > 20:  # (bounded, as every header a node sends on)
        raise ValueError(raw)
    v = int(raw)
    if not 0 <= v <= MAX_SVC:
        raise ValueError(raw)
    return v


class CallMessage:
    """A validated incoming call. The node extends it with its own bookkeeping fields."""

    __slots__ = ("meta", "method", "args", "kwargs", "reply", "data")

    meta: CallMeta
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    reply: str
    data: bytes | None
    """The body as received, so a node can forward the call without encoding it again (dropped when it
    starts)."""


def _id_header(headers: dict[str, str] | None) -> str:
    if not headers:
        raise MalformedMessage("message has no headers (a nalar call carries Nalar-Id)")
    fid = headers.get(H_ID)
    if not fid or len(fid) > MAX_ID_LEN:
        raise MalformedMessage("message has no valid Nalar-Id header")
    return fid


C = TypeVar("C", bound=CallMessage)


@overload
def decode_call(data: bytes, headers: dict[str, str] | None, reply: str) -> CallMessage: ...
@overload
def decode_call(data: bytes, headers: dict[str, str] | None, reply: str, cls: type[C]) -> C: ...


def decode_call(data: bytes, headers: dict[str, str] | None, reply: str,
                cls: type[CallMessage] = CallMessage) -> CallMessage:
    """Validate and decode one call into ``cls()`` (the node's subclass); raises ``MalformedMessage``."""
    meta = CallMeta.from_headers(headers)
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
    c.meta = meta
    c.method = method
    c.args = args
    c.kwargs = kwargs
    c.reply = reply
    c.data = data
    return c


def decode_reply(data: bytes) -> tuple[bool, Any]:
    """Return ``(True, value)`` or ``(False, wire)`` (``errors.from_wire`` reads it); raises ``MalformedMessage``."""
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
