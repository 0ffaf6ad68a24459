"""Batching: calls to a ``batchable`` method gathered into one invocation on a list of argument sets.

The scheduler binds calls one by one, as for any method; a batchable call bound to an instance joins
the batch forming there for its method and argument shape (how many positional arguments, which
keywords) instead of starting. The first call of a batch takes the instance's slot; the others ride
along without one, so a busy instance's queue drains into its next batch in one ``pump``. A batch runs
when it is full (``max_batch_size``) or when its first call has waited ``max_batch_wait_ms`` since it
arrived: an idle instance runs a lone call after at most that wait, a loaded one runs full batches
without waiting (its calls have waited in the queue already).

The method is called once with one list per parameter (``embed(texts)`` for calls ``embed(text)``)
and returns one result per call, in order; an exception as a result fails only its own call. Each
call keeps its own future, deadline and cancellation: one that ends while its batch forms or runs is
answered then, and the batch's result for it is dropped. A batch's own calls (if the method makes
any) belong to no caller: they are not cancelled with any one of them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from .calls import Call, Instance


class Batch:
    """Calls bound together to one instance for one invocation of ``method``."""

    __slots__ = ("inst", "method", "key", "calls", "timer", "task", "done")

    def __init__(self, inst: Instance, method: str, key: tuple[Any, ...]) -> None:
        self.inst = inst
        self.method = method
        self.key = key
        self.calls: list[Call] = []
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # an ``async def`` method's task, once it runs
        self.done = False  # every call answered: the run (if any) is no longer wanted

    def columns(self) -> tuple[list[list[Any]], dict[str, list[Any]]]:
        """The calls' arguments as one list per parameter, in the calls' order."""
        calls = self.calls
        n = len(calls[0].args)
        args = [[c.args[i] for c in calls] for i in range(n)]
        kwargs = {k: [c.kwargs[k] for c in calls] for k in calls[0].kwargs}
        return args, kwargs


def shape(c: Call) -> tuple[Any, ...]:
    """What calls must share to be batched together: the method, its positional count, its keywords."""
    return (c.method, len(c.args), tuple(sorted(c.kwargs)))


class Batcher:
    """The batches forming on this node's instances; ``run`` starts a batch that is ready."""

    def __init__(self, run: Callable[[Batch], None]) -> None:
        self.run = run
        self.forming: dict[tuple[Any, ...], Batch] = {}
        self.batches = 0  # run so far, and the calls they held (``nalar status``)
        self.batched_calls = 0

    def add(self, inst: Instance, c: Call) -> bool:
        """``c`` is bound to ``inst``: add it to the batch forming there. True if it opened a new batch
        (which takes the instance's slot); the batch runs when full or when its wait is up."""
        h = inst.group.hints
        key = (inst.id, *shape(c))
        b = self.forming.get(key)
        opened = b is None
        if b is None:
            b = self.forming[key] = Batch(inst, c.method, key)
            wait = max(0.0, c.arrived + h.max_batch_wait_ms / 1000 - time.monotonic()) if c.arrived else 0.0
            # even at 0: after the current pump, which may bring the rest of the batch from the queue
            b.timer = asyncio.get_running_loop().call_later(wait, self.ready, b)
        b.calls.append(c)
        if len(b.calls) >= h.max_batch_size:
            self.ready(b)
        return opened

    def joins(self, inst: Instance, c: Call) -> bool:
        """Whether ``c`` would join a batch forming at ``inst`` that has room (so it needs no slot)."""
        b = self.forming.get((inst.id, *shape(c)))
        return b is not None and len(b.calls) < inst.group.hints.max_batch_size and not inst.draining

    def ready(self, b: Batch) -> None:
        """Stop forming ``b`` and run it (its calls that ended meanwhile are left out)."""
        if self.forming.get(b.key) is not b:
            return
        del self.forming[b.key]
        if b.timer is not None:
            b.timer.cancel()
            b.timer = None
        b.calls = [c for c in b.calls if not c.done]
        self.batches += 1
        self.batched_calls += len(b.calls)
        self.run(b)

    def status(self) -> dict[str, Any]:
        return {"batches": self.batches, "batched_calls": self.batched_calls, "forming": len(self.forming),
                "mean_size": round(self.batched_calls / self.batches, 2) if self.batches else None}
