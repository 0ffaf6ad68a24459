"""A coarse timer wheel for deadlines.

One ``TimerHandle`` per pending call costs memory and heap work at 100k+ calls; instead each deadline
lands in a bucket and one periodic task expires whole buckets. Buckets are 0.1 s wide for deadlines
less than 10 s away, 1 s up to 1000 s, 10 s beyond: a deadline fires at most one bucket late (a tenth
of the time left, or less), and long deadlines under steady traffic keep few buckets alive.
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
        self._in_heap: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, deadline: float, item: Any) -> int:
        """Must run on the loop thread; returns the key to ``discard`` the item with."""
        ticks = int(deadline / TICK)
        ahead = ticks - int(time.time() / TICK)
        res = 1 if ahead < 100 else 10 if ahead < 10_000 else 100
        k = (ticks // res + 1) * res
        b = self._buckets.get(k)
        if b is None:
            self._buckets[k] = {item}
            if k not in self._in_heap:
                self._in_heap.add(k)
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
            if not b:
                del self._buckets[key]  # its key stays in the heap and is skipped when it comes up

    def __len__(self) -> int:
        """Items armed (for status and tests; O(buckets))."""
        return sum(len(b) for b in self._buckets.values())

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    async def _run(self) -> None:
        try:
            while self._keys:
                await asyncio.sleep(TICK)
                now = int(time.time() / TICK)
                while self._keys and self._keys[0] <= now:
                    k = heapq.heappop(self._keys)
                    self._in_heap.discard(k)
                    for item in list(self._buckets.pop(k, ())):
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
