"""Streaming actors for tests/test_streaming.py (node processes import this module)."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import nalar

#: Ticker.hold's gates and what it saw, per node process.
_GATES: dict[str, asyncio.Event] = {}
_CLOSED: dict[str, int] = {}


class Ticker(nalar.Tool):
    """Streams numbers; ``hold`` stops half-way until its gate opens, ``broken`` fails half-way."""

    async def count(self, n: int, size: int = 0) -> AsyncIterator[Any]:
        for i in range(n):
            yield {"i": i, "pad": "x" * size} if size else i

    async def hold(self, gate: str, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                if i == n // 2:
                    await asyncio.wait_for(_GATES.setdefault(gate, asyncio.Event()).wait(), 60)
                yield i
        finally:  # a cancelled caller's stream is closed here, where an engine would abort its request
            _CLOSED[gate] = _CLOSED.get(gate, 0) + 1

    async def broken(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            if i == n // 2:
                raise ValueError(f"broke at {i}")
            yield i

    async def not_json(self) -> AsyncIterator[Any]:
        yield 1
        yield object()

    async def release(self, gate: str) -> int:
        _GATES.setdefault(gate, asyncio.Event()).set()
        return _CLOSED.get(gate, 0)

    async def closed(self, gate: str) -> int:
        return _CLOSED.get(gate, 0)


@nalar.hints(stateful=True)
class StatefulStream(nalar.Agent):
    """Refused at start: a stateful actor's methods cannot stream."""

    async def go(self) -> AsyncIterator[int]:
        yield 1


@nalar.hints(preemptable=True, max_concurrency=1, max_instances=1)
class SlowStream(nalar.Tool):
    """A preemptable streaming method: once its items went out it is not preempted (a re-run would
    send them again)."""

    async def tick(self, n: int, every: float) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(every)

    async def quick(self) -> str:
        return "quick"

    async def nothing(self) -> AsyncIterator[int]:
        return
        yield 0
