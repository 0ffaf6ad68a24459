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
    """Items are handed to ``on_expire(item)`` when their bucket's time passes.

    A finished item is taken out with ``discard(key, item)`` so that nothing outlives its call: at
    20k calls/s a 300 s default deadline would otherwise pin millions of finished futures.
    """

    def __init__(self, on_expire: Callable[[Any], None]) -> None:
        self._on_expire = on_expire
        self._buckets: dict[int, set[Any]] = {}
        self._keys: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, deadline: float, item: Any) -> int:
        """Must run on the loop thread; returns the key to ``discard`` the item with."""
        k = int(deadline / TICK) + 1
        b = self._buckets.get(k)
        if b is None:
            self._buckets[k] = {item}
            heapq.heappush(self._keys, k)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            b.add(item)
        return k

    def discard(self, key: int, item: Any) -> None:
        """Must run on the loop thread."""
        b = self._buckets.get(key)
        if b is not None:
            b.discard(item)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

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
