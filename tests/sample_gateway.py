"""Actors for tests/test_gateway.py (node processes import this module)."""
from __future__ import annotations

import asyncio
from typing import Any

import nalar


@nalar.hints(max_instances=1)  # one instance holds the counters, whatever the policy actor decides
class ParkingChat(nalar.Tool):
    """Speaks the model actors' ``chat`` and ``generate`` but never answers: a generation that takes
    forever, for a client that leaves mid-stream. Counts what started and what was cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def _park(self) -> dict[str, Any]:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {}

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        return await self._park()

    async def generate(self, prompt: str, **params: Any) -> dict[str, Any]:
        return await self._park()

    async def stats(self) -> dict[str, int]:
        return {"started": self.started, "cancelled": self.cancelled}


#: Narrow's gates, per node process (async tools share the node's loop).
_GATES: dict[str, asyncio.Event] = {}


@nalar.hints(max_concurrency=1, max_instances=1)
class Narrow(nalar.Tool):
    """Runs one call at a time on one instance: with ``--max-queue 1`` the third call is ``Overloaded``."""

    async def block(self, gate: str) -> str:
        await asyncio.wait_for(_GATES.setdefault(gate, asyncio.Event()).wait(), 60)
        return gate


@nalar.hints(max_concurrency=None, max_instances=1)
class NarrowCtl(nalar.Tool):
    """Opens a gate of Narrow's (which is busy, so it cannot open its own)."""

    async def release(self, gate: str) -> bool:
        _GATES.setdefault(gate, asyncio.Event()).set()
        return True
