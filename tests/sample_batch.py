"""Batchable actors for tests/test_batching.py (node processes import this module)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import nalar


@nalar.hints(batchable="embed", max_batch_size=8, max_batch_wait_ms=20)
class Embedder(nalar.Tool):
    """A sync tool whose invocation has a fixed cost (a kernel launch): batching amortises it."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def embed(self, texts: list[str], scale: list[int | None] | None = None) -> list[Any]:
        self.sizes.append(len(texts))
        time.sleep(0.01)
        if any(t == "explode" for t in texts):
            raise RuntimeError("the whole batch failed")
        if any(t == "short" for t in texts):
            return [0]  # the wrong number of results
        return [ValueError(f"bad input {t!r}") if t.startswith("bad") else len(t) * (s or 1)
                for t, s in zip(texts, scale or [None] * len(texts))]

    def seen(self) -> list[int]:
        return list(self.sizes)


@nalar.hints(batchable="work", max_batch_size=16, max_batch_wait_ms=300, max_concurrency=4)
class SlowGather(nalar.Tool):
    """An async tool with a long batch window: calls end (cancelled, expired) while their batch forms
    or runs."""

    def __init__(self) -> None:
        self.invocations: list[list[str]] = []

    async def work(self, items: list[str]) -> list[str]:
        self.invocations.append(list(items))
        if any(i.startswith("slow") for i in items):
            await asyncio.sleep(1.0)
        return [i.upper() for i in items]

    async def calls(self) -> list[list[str]]:
        return [list(x) for x in self.invocations]


#: What Worker ran, per node process: (job, preemptions before that run) per start, and what finished.
_RUNS: list[tuple[str, int]] = []
_FINISHED: list[str] = []


@nalar.hints(preemptable=True, max_concurrency=1, max_instances=1)
class Worker(nalar.Tool):
    """An async tool with one slot: a long low-priority job gives it up to an urgent one."""

    async def job(self, name: str, seconds: float) -> str:
        _RUNS.append((name, nalar.preemptions()))
        await asyncio.sleep(seconds)
        _FINISHED.append(name)
        return name


@nalar.hints(max_concurrency=None)
class WorkerLog(nalar.Tool):
    """Reads Worker's log without taking (or preempting) Worker's one slot."""

    async def log(self) -> dict[str, Any]:
        return {"runs": list(_RUNS), "finished": list(_FINISHED)}


@nalar.hints(preemptable=True, max_concurrency=1, stateful=True, max_instances=1)
class Tally(nalar.Agent):
    """A stateful preemptable agent: a preempted call's change is not committed twice."""

    async def add(self, n: int, seconds: float) -> int:
        total = nalar.managed_value("total", 0)
        total.value += n
        await asyncio.sleep(seconds)
        return total.value  # type: ignore[no-any-return]


_ASKED: dict[str, bool] = {}


@nalar.hints(preemptable="give_up", max_instances=1)
class SyncWorker(nalar.Tool):
    """A def-method tool: the node calls ``give_up``, the running method raises ``Preempted``."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def give_up(self) -> None:  # called on the node's loop thread while job runs on the instance's
        _ASKED["now"] = True

    def job(self, name: str, steps: int) -> str:
        self.runs.append(name)
        for _ in range(steps):
            if _ASKED.pop("now", False):
                raise nalar.Preempted()
            time.sleep(0.01)
        return name

    def log(self) -> list[str]:
        return list(self.runs)
