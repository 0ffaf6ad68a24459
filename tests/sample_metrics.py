"""Actors for tests/test_metrics.py: calls that wait in line until the test lets them through."""
from __future__ import annotations

import asyncio

import nalar

_OPEN: asyncio.Event | None = None  # on the node's loop: both actors' methods are async


def _door() -> asyncio.Event:
    global _OPEN
    if _OPEN is None:
        _OPEN = asyncio.Event()
    return _OPEN


@nalar.hints(max_concurrency=1)
class Held(nalar.Tool):
    """One call at a time, each held until ``Door.open``: the others queue (the sessions in line)."""

    async def wait(self, x: int) -> int:
        await _door().wait()
        return x


class Door(nalar.Tool):
    async def open(self) -> bool:
        _door().set()
        return True
