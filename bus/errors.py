"""Errors that cross process boundaries.

They live at the bottom layer because the envelope codec turns them into bytes and back; every other
layer raises or catches them through ``nalar``'s public names. The wire form of an error has one home,
both directions: ``RemoteError.to_wire``/``from_wire`` for nalar's own, ``to_wire`` for what user code raised.
"""
from __future__ import annotations

import traceback as _tb
from typing import Any, Callable

import pykka


class NalarError(Exception):
    """Base of every error nalar raises itself."""


class BusError(NalarError):
    """The message bus cannot be reached or refused an operation."""


class ServerNotFound(BusError):
    """The ``nats-server`` binary is not installed where nalar looks for it."""


class PayloadTooLarge(NalarError, ValueError):
    """An encoded message is over the server's ``max_payload``."""

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(
            f"{what} is {size} bytes, over the NATS server's max_payload of {limit} bytes; "
            "send a reference (a key, a path) instead of the bytes, or raise max_payload"
        )
        self.size = size
        self.limit = limit


class MalformedMessage(NalarError, ValueError):
    """An incoming message failed validation at the edge."""


class Timeout(NalarError, pykka.Timeout, TimeoutError):
    """Waiting on a future took longer than the caller's ``timeout`` (the call itself goes on)."""


class RemoteError(NalarError):
    """A call failed on the remote side.

    Carries what the executor reported: the remote exception's type name, its message, where it ran
    (actor, method) and the remote traceback, plus ``chain``, the errors of the futures below it
    when it came from a nested call. ``to_wire``/``from_wire`` are its wire form, both directions here.
    """

    kind = "error"

    def __init__(
        self,
        type: str,
        message: str,
        actor: str = "",
        method: str = "",
        traceback: str = "",
        chain: list[dict[str, Any]] | None = None,
        future_id: str = "",
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.actor = actor
        self.method = method
        self.traceback = traceback
        self.chain = chain or []
        self.future_id = future_id

    def __str__(self) -> str:
        where = f"{self.actor}.{self.method}" if self.actor else "remote call"
        text = f"{where} raised {self.type}: {self.message}"
        if self.traceback:
            text += "\n--- remote traceback ---\n" + self.traceback.rstrip()
        return text

    def to_wire(self) -> dict[str, Any]:
        """The ``{"e": ...}`` part of a reply; ``from_wire`` reads it back (as this subclass, by ``kind``)."""
        return {
            "kind": self.kind,
            "type": self.type,
            "message": self.message,
            "actor": self.actor,
            "method": self.method,
            "traceback": self.traceback,
            "chain": self.chain,
            "future_id": self.future_id,
        }


class _Own(RemoteError):
    """A failure nalar itself reports: its ``type`` is the class name unless told otherwise (a
    ``BadRequest`` for a ``TypeError`` says ``type="TypeError"``).

    Everything but the message is keyword-only, so code written for the old form ``Cls(type, message)``
    fails loudly instead of sending its message as the actor's name.
    """

    def __init__(
        self,
        message: str,
        *,
        actor: str = "",
        method: str = "",
        traceback: str = "",
        chain: list[dict[str, Any]] | None = None,
        future_id: str = "",
        type: str | None = None,
    ) -> None:
        super().__init__(type or self.__class__.__name__, message, actor, method, traceback, chain, future_id)


class UnknownActor(_Own):
    """No node serves the actor that was called (answered at once by NATS' no-responders status)."""

    kind = "unknown_actor"


class UnknownMethod(_Own, AttributeError):
    """The actor exists but has no public method of that name."""

    kind = "unknown_method"


class BadRequest(_Own, ValueError):
    """The executor could not decode or validate the call."""

    kind = "bad_request"


class DeadlineExceeded(_Own, TimeoutError):
    """The call's deadline passed before it finished; the work was cancelled where it ran."""

    kind = "deadline"


class Cancelled(_Own):
    """The call was cancelled by its caller or by a cancelled parent."""

    kind = "cancelled"


class Overloaded(_Own):
    """The executor's queue is full: back off and retry."""

    kind = "overloaded"


class DependencyFailed(_Own):
    """A future passed as an argument failed, so the call never ran."""

    kind = "dependency"


class Unavailable(_Own):
    """No executor could take the call (all attempts went unanswered, or its state's holder is down).

    When an attempt went unanswered it may have run: the message says the outcome is unknown and
    names the key (``future_id``) to call again with, ``stub.options(key=...)``, to learn it."""

    kind = "unavailable"


class StateError(_Own):
    """Session state could not be read, committed or moved (the message says why)."""

    kind = "state"


class StateFull(StateError):
    """The node's LMDB map reached its maximum size: nothing was written."""

    kind = "state_full"


class Conflict(StateError):
    """Another call committed the same session objects first (retried by the runtime before you see it)."""

    kind = "conflict"


_KINDS: dict[str, type[RemoteError]] = {
    cls.kind: cls
    for cls in (RemoteError, UnknownActor, UnknownMethod, BadRequest, DeadlineExceeded, Cancelled,
                Overloaded, DependencyFailed, Unavailable, StateError, StateFull, Conflict)
}


def from_wire(d: dict[str, Any]) -> RemoteError:
    """Rebuild a ``RemoteError`` (of the subclass its ``kind`` names) from its wire form; tolerant of
    missing keys, since any process (or a hand-made control reply) may have written it."""
    cls = _KINDS.get(str(d.get("kind", "error")), RemoteError)
    chain = d.get("chain")
    return cls(
        type=str(d.get("type", "Exception")),
        message=str(d.get("message", "")),
        actor=str(d.get("actor", "")),
        method=str(d.get("method", "")),
        traceback=str(d.get("traceback", "")),
        chain=chain if isinstance(chain, list) else [],
        future_id=str(d.get("future_id", "")),
    )


def _safe(fn: Callable[[], Any], fallback: str) -> str:
    try:
        return str(fn())
    except BaseException:  # an exception whose __str__ raises must not take the node down
        return fallback


def to_wire(e: BaseException, actor: str, method: str, future_id: str) -> dict[str, Any]:
    """The wire form of an exception raised by user code, with its traceback.

    Its kind is always ``"error"`` (the method failed, whatever it raised); a ``RemoteError`` it let
    through keeps its remote ``type`` and joins the ``chain``, so the caller sees the nested failure.
    """
    tb = _safe(lambda: "".join(_tb.format_exception(e)), f"{type(e).__qualname__} (traceback unavailable)")
    if isinstance(e, RemoteError):
        return {"kind": "error", "type": e.type, "message": e.message, "actor": actor, "method": method,
                "traceback": tb, "chain": [e.to_wire()] + list(e.chain), "future_id": future_id}
    return {"kind": "error", "type": type(e).__qualname__,
            "message": _safe(lambda: e, f"<unprintable {type(e).__qualname__}>"),
            "actor": actor, "method": method, "traceback": tb, "chain": [], "future_id": future_id}
