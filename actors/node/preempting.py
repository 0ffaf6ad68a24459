"""Preemption in the node (``actors/preempt.py`` is what user code sees): choosing the running call
that gives its instance up to a waiting one of higher priority, and putting it back in its queue. A
part of the executor (``Executor`` mixes it in).
"""
from __future__ import annotations

import logging
import time

from ...bus.errors import DeadlineExceeded, RemoteError
from ..preempt import PREEMPTED
from ..runtime import Runtime
from .calls import Book, Call, Instance, Queue

log = logging.getLogger("nalar.node")

#: Times one call may be preempted: after that it runs to its end (no call starves).
MAX_PREEMPTIONS = 3


class Preemption:
    """The executor's preemption; the executor provides the books and ``fail``."""

    rt: Runtime
    book: Book
    queue: Queue | None
    _running: dict[str, set[Call]]  # preemptable actors' running calls, by actor
    _preempting: set[str]  # ids of the calls told to give their instance up
    _streaming: set[str]  # ids of streaming calls that sent an item (never preempted)

    def fail(self, c: Call, err: type[RemoteError], message: str) -> None:
        raise NotImplementedError

    def complete(self, inst: Instance, c: Call, ok: bool, value: object) -> None:
        raise NotImplementedError

    def preempt_for(self, c: Call) -> bool:
        """``c`` waits and no instance has room: preempt the running call of lowest priority, below
        ``c``'s, on an instance that could run it (the most recently started among equals: the least
        work lost). False if there is none."""
        g = c.group
        running = self._running.get(g.name)
        if not running:
            return False
        prio = self.rt.table.priority
        want = prio(c.meta.session, g.name, c.meta.priority)
        victim, low = None, want
        for r in running:
            if r.done or r.committing or r.id in self._preempting or r.inst is None or r.inst.draining:
                continue
            if r.id in self._streaming:  # its items went out: a re-run would send them again
                continue
            if c.pinned is not None and r.inst is not c.pinned:
                continue
            if r.scope is not None and r.scope.preemptions >= MAX_PREEMPTIONS:
                continue
            p = prio(r.meta.session, g.name, r.meta.priority)
            if p < low or (victim is not None and p == low and r.started > victim.started):
                victim, low = r, p
        if victim is None:
            return False
        assert victim.inst is not None
        how = g.hints.preemptable
        unstarted = False
        if victim.task is not None:
            victim.task.cancel(PREEMPTED)
            unstarted = not victim.begun  # its method never runs, nor says it ended: the executor does
        elif isinstance(how, str):
            try:
                getattr(victim.inst.obj, how)()  # the running def method answers with Preempted
            except Exception:
                log.exception("%s.%s (the preempt method) failed", g.name, how)
                return False
        else:
            return False  # a def method without a preempt method cannot be interrupted
        self._preempting.add(victim.id)
        self.book.counters["preempted"] = self.book.counters.get("preempted", 0) + 1
        if unstarted:
            self.complete(victim.inst, victim, False, None)  # back in its queue; the slot to ``c``
        return True

    def _requeue(self, c: Call) -> None:
        """A preempted call goes back to its queue, with its future id, to run again from the start:
        nothing it changed was committed (a commit comes only after a method returns), and the calls
        its run made are cancelled (the next run makes its own)."""
        scope = c.scope
        if scope is not None:
            scope.preemptions += 1
            children, scope.children = scope.children, None
            for child in children or ():
                child.cancel()
        c.txn = None
        c.inst = None
        c.task = None
        if c.meta.deadline and time.time() >= c.meta.deadline:
            self.fail(c, DeadlineExceeded, "the call's deadline passed while it was preempted; nothing was committed")
            return
        assert self.queue is not None
        self.queue.requeue(c)
