"""The call being executed right now, so calls it makes inherit its request, session, deadline and trace.

Set by the node for the duration of a method (per task for ``async def``, per thread for ``def``).
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

#: The node's record of the executing call (``actors.node.Call``), or ``None`` outside a call.
current_call: ContextVar[Any] = ContextVar("nalar_current_call", default=None)


def session() -> str | None:
    """The session id of the call being executed, if any (``nalar.session()``)."""
    c = current_call.get()
    return c.session if c is not None else None


def deadline() -> float | None:
    """The absolute deadline (Unix time) of the call being executed, if any (``nalar.deadline()``)."""
    c = current_call.get()
    return c.deadline if c is not None and c.deadline else None
