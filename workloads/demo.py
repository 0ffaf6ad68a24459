"""The demo workload served by ``nalar up``: an agent that fans out to two tools and combines.

Try ``nalar call Analyst.analyze '["the quick brown fox jumps over the lazy dog the end"]'``.
"""
from __future__ import annotations

import asyncio
import re
from collections import Counter

import nalar


class Stats(nalar.Tool):
    """Counts words and characters (a sync tool: one call at a time per instance)."""

    def count(self, text: str) -> dict[str, int]:
        return {"words": len(text.split()), "chars": len(text)}


class Keywords(nalar.Tool):
    """The most frequent words (an async tool: many calls at once on the node's loop)."""

    async def top(self, text: str, k: int = 3) -> list[str]:
        await asyncio.sleep(0)
        words = re.findall(r"[a-z']+", text.lower())
        return [w for w, _ in Counter(words).most_common(k)]


@nalar.hints(max_instances=8)
class Analyst(nalar.Agent):
    """Calls both tools at once (two futures in flight), then combines their answers."""

    stats = nalar.stub(Stats)
    keywords = nalar.stub(Keywords)

    def analyze(self, text: str) -> dict[str, object]:
        counts, top = self.stats.count(text), self.keywords.top(text)
        return {"stats": counts.result(), "keywords": top.result()}


@nalar.hints(stateful=True)
class Notebook(nalar.Agent):
    """Session state: ``nalar call Notebook.add '["buy milk"]' --session me``, then ``nalar state show me``."""

    def add(self, note: str) -> int:
        notes = nalar.managed_list("notes")
        notes.append(note)
        return len(notes)

    def notes(self) -> list[str]:
        return list(nalar.managed_list("notes"))


@nalar.hints(max_concurrency=None)
class Echo(nalar.Tool):
    """Returns its argument; used by ``nalar bench calls``. ``wait`` parks until ``release``."""

    def __init__(self) -> None:
        self._gate = asyncio.Event()

    async def echo(self, x: object) -> object:
        return x

    async def wait(self, x: object = None) -> object:
        await self._gate.wait()
        return x

    async def release(self) -> bool:
        self._gate.set()
        return True

    async def reset(self) -> bool:
        self._gate = asyncio.Event()
        return True


#: What ``nalar up`` and ``nalar node --demo`` serve: (class, instances).
DEMO = [(Analyst, 2), (Stats, 2), (Keywords, 1), (Notebook, 1), (Echo, 1)]
