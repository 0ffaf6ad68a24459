"""Preemption as user code sees it: the signal, and how many times a call was preempted before.

A node preempts a running call of a ``preemptable`` actor when a call of higher priority waits and no
instance has room for it. An ``async def`` method is cancelled: the ``CancelledError`` it sees carries
``PREEMPTED`` as its message, so code that must tell it from a caller's cancel can
(``is_preemption``). A ``def`` method cannot be interrupted from outside: the hint names a method of
the actor (``preemptable="yield_now"``) that the node calls instead, and the running method answers by
raising ``Preempted`` soon after. Either way the call goes back to its queue with its future id and
runs again from the start, its session state untouched (a change commits only when a method returns);
``preemptions()`` tells the new run how many times it was preempted, so a method that keeps its own
progress can resume.
"""
from __future__ import annotations

import asyncio

from .context import current_scope

#: The message of the ``CancelledError`` a preempted ``async def`` method sees.
PREEMPTED = "nalar: preempted by a call of higher priority"


class Preempted(Exception):
    """Raised by a ``def`` method that was asked (through its actor's preempt method) to give its
    instance up: the node runs the call again later."""

    def __init__(self, message: str = "the call gave its instance up to a call of higher priority") -> None:
        super().__init__(message)


def preemptions() -> int:
    """How many times the call being executed was preempted before this run (0 outside a call)."""
    s = current_scope.get()
    return s.preemptions if s is not None else 0


def is_preemption(e: BaseException) -> bool:
    """Whether ``e`` is a preemption: ``Preempted``, or a cancel the node made to preempt."""
    return isinstance(e, Preempted) or (isinstance(e, asyncio.CancelledError) and PREEMPTED in e.args)
