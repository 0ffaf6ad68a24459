"""A coarse timer wheel for deadlines.

One ``TimerHandle`` per pending call costs memory and heap work at 100k+ calls; instead each deadline
lands in a 100 ms bucket and one periodic task expires whole buckets. Deadlines are therefore enforced
to within about a tenth of a second, which is plenty for calls measured in milliseconds to minutes.
"""
from __future__ import annotations

import asyncio
import heapq
import time
from typing import Any, Callable

TICK = 0.1


class DeadlineWheel:
    """Items are checked on expiry by ``on_expire(item)``; the callback ignores finished items."""

    def __init__(self, on_expire: Callable[[Any], None]) -> None:
        self._on_expire = on_expire
        self._buckets: dict[int, list[Any]] = {}
        self._keys: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, deadline: float, item: Any) -> None:
        """Must run on the loop thread."""
        k = int(deadline / TICK) + 1
        b = self._buckets.get(k)
        if b is None:
            self._buckets[k] = [item]
            heapq.heappush(self._keys, k)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            b.append(item)

    async def _run(self) -> None:
        try:
            while self._keys:
                await asyncio.sleep(TICK)
                now = int(time.time() / TICK)
                while self._keys and self._keys[0] <= now:
                    for item in self._buckets.pop(heapq.heappop(self._keys), ()):
                        try:
                            self._on_expire(item)
                        except Exception:  # an expiry handler must never stop the wheel
                            import logging

                            logging.getLogger("nalar.deadline").exception("deadline handler failed")
        finally:
            self._task = None

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
