"""The scope of the call being executed right now: what the calls it makes inherit.

The node sets ``current_scope`` for the duration of a method (per task for ``async def``, per thread
for ``def``). ``Runtime.call`` reads only this scope, never the node's own bookkeeping, so the caller
side does not depend on the executor: the scope is the whole contract between them.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .future import Future


class CallScope:
    """One executing call, as the calls it makes see it (Trio's cancel scope, for nalar calls)."""

    __slots__ = ("id", "request", "session", "priority", "deadline", "stage", "born", "actor", "holds_unit",
                 "otel_ctx", "children", "closed", "preemptions", "svc_base", "svc")

    id: str
    """The executing call's future id: the parent of the calls it makes."""
    request: str
    """Its root request's id, which its children carry on."""
    session: str | None
    """Its session: children inherit it unless they name another (or ``None``)."""
    priority: int
    """Its priority: children inherit it unless they set their own."""
    deadline: float
    """Its absolute deadline (Unix time; 0.0: none): children's deadlines are capped by it."""
    stage: int
    """Its stage; a child's is this plus how many children came before it, itself included."""
    born: int
    """When its request started (Unix µs), which children carry on."""
    actor: str
    """The actor running it (for the self-call check)."""
    holds_unit: bool
    """Whether it holds its session's turn at ``actor``: then calling ``actor`` in the same session
    would wait for itself."""
    otel_ctx: Any
    """The OpenTelemetry context of its span, the parent of its children's spans (``None``: untraced)."""
    children: list[Future[Any]] | None
    """The futures of the calls it made, cancelled with it."""
    closed: bool
    """Set once it is answered or aborted: it may not start new work."""
    preemptions: int
    """How many times the node preempted it before this run (``nalar.preemptions()``): a method that
    saves its progress can resume from it."""
    svc_base: int
    """The service its program had received when it was called, µs (``Nalar-Svc``)."""
    svc: int
    """The program's service along its critical path so far: ``svc_base``, then, as each child answers,
    the most of (the child's ``svc`` when sent + the service its subtree reports). Sequential children
    add up; children run side by side count as the longest. What its own children carry."""

    def __init__(self, id: str, request: str, session: str | None, priority: int, deadline: float, stage: int,
                 born: int, actor: str, holds_unit: bool, otel_ctx: Any,
                 children: list[Future[Any]] | None = None, closed: bool = False, svc: int = 0) -> None:
        self.id = id
        self.request = request
        self.session = session
        self.priority = priority
        self.deadline = deadline
        self.stage = stage
        self.born = born
        self.actor = actor
        self.holds_unit = holds_unit
        self.otel_ctx = otel_ctx
        self.children = children
        self.closed = closed
        self.preemptions = 0
        self.svc_base = self.svc = svc


#: The scope of the executing call, or ``None`` outside a call.
current_scope: ContextVar[CallScope | None] = ContextVar("nalar_current_scope", default=None)


def session() -> str | None:
    """The session id of the call being executed, if any (``nalar.session()``)."""
    s = current_scope.get()
    return s.session if s is not None else None


def deadline() -> float | None:
    """The absolute deadline (Unix time) of the call being executed, if any (``nalar.deadline()``)."""
    s = current_scope.get()
    return s.deadline if s is not None and s.deadline else None
