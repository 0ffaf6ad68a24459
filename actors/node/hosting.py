"""Instance lifecycle: the one place an instance is created, started (``on_start``, its pykka thread)
and stopped (``on_stop``, sync or async), whether at node start, by ``provision`` or by ``kill``."""
from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from functools import partial
from typing import Any, Callable

import pykka

from ...bus import errors
from ..base import run_hook
from .calls import ActorGroup, Book, Call, Instance

log = logging.getLogger("nalar.node")
_KEEP: set[asyncio.Task[None]] = set()  # on_stop tasks still running (the loop keeps only weak refs)



class StartFailed(RuntimeError):
    """An instance's ``on_start`` raised: the user's error, said in a line and where it came from (the
    frame of their code it was raised in), not as the runtime's whole traceback."""

    def __init__(self, instance: str, cause: BaseException) -> None:
        self.instance, self.cause = instance, cause
        where = ""
        tb = traceback.extract_tb(cause.__traceback__)
        if tb:
            f = tb[-1]
            where = f" (at {errors.wire_filename(f.filename)}:{f.lineno}, in {f.name})"
        super().__init__(f"{instance}: on_start failed: {type(cause).__name__}: {cause}{where}")

class _Host(pykka.ThreadingActor):
    """The pykka actor behind a sync instance: its mailbox serialises the instance's calls.

    Its thread is a daemon so that a method stuck forever cannot keep a stopping node alive.
    """

    use_daemon_thread = True

    def __init__(self, run: Callable[[Instance, Call], None], inst: Instance) -> None:
        super().__init__()
        self._run = run
        self._inst = inst

    def on_stop(self) -> None:
        if inspect.iscoroutinefunction(self._inst.obj.on_stop):
            return  # an async on_stop runs on the node's loop (Hosting.stop)
        try:
            self._inst.obj.on_stop()
        except Exception:
            log.exception("%s.on_stop failed", self._inst.id)

    def on_receive(self, message: Any) -> Any:
        self._run(self._inst, message)


class Hosting:
    """Creates, starts and stops instances; ``run_sync`` is what a sync instance's thread runs."""

    def __init__(self, book: Book, run_sync: Callable[[Instance, Call], None]) -> None:
        self.book = book
        self.run_sync = run_sync
        self.retired = 0

    def new(self, g: ActorGroup) -> Instance:
        i = g.next_index
        g.next_index += 1
        iid = f"{g.name}-{self.book.name}-{i}"
        obj = g.cls()
        obj._nalar_instance = iid  # lets an instance name itself (a model's completions say who served them)
        return Instance(iid, g, obj, g.hints.concurrency_for(g.has_async))

    async def start(self, inst: Instance) -> None:
        """Run ``on_start`` (a failure raises ``StartFailed``), then give a sync instance its thread."""
        try:
            await run_hook(inst.obj.on_start)
        except Exception as e:
            raise StartFailed(inst.id, e) from e
        if inst.group.has_sync:
            inst.host = _Host.start(self.run_sync, inst)

    def add(self, inst: Instance) -> None:
        """``inst`` is started: it takes calls from now on."""
        inst.group.instances.append(inst)
        self.book.instances[inst.id] = inst

    def tell(self, inst: Instance, c: Call) -> None:
        """Hand ``c`` to a sync instance's thread."""
        try:
            assert inst.host is not None
            inst.host.tell(c)
        except pykka.ActorDeadError:  # its thread died (it cannot, short of a bug): replace it, once
            log.error("instance %s had died; starting a new thread for it", inst.id)
            inst.host = _Host.start(self.run_sync, inst)
            inst.host.tell(c)

    def retire(self, inst: Instance) -> None:
        """A drained instance is gone: out of its group, its thread and ``on_stop`` run soon."""
        g = inst.group
        if inst in g.instances:
            g.instances.remove(inst)
        self.book.instances.pop(inst.id, None)
        self.retired += 1
        _, on_thread = self._stop_host(inst)
        if not on_thread:
            task = asyncio.get_running_loop().create_task(_run_on_stop(inst))
            _KEEP.add(task)
            task.add_done_callback(_KEEP.discard)

    async def stop_all(self, grace: float) -> None:
        """Node stop: every instance's ``on_stop`` (sync ones on their threads, together), bounded."""
        stopping = []
        for g in self.book.groups.values():
            for inst in g.instances:
                f, on_thread = self._stop_host(inst)
                if f is not None:
                    stopping.append(f)
                if not on_thread:
                    await _run_on_stop(inst)
        if stopping:  # all together, bounded: a method stuck forever leaves only a daemon thread behind
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, partial(pykka.get_all, stopping, timeout=grace))
            except pykka.Timeout:
                log.warning("some instances did not stop within %s s; leaving their threads behind", grace)

    @staticmethod
    def _stop_host(inst: Instance) -> tuple[Any, bool]:
        """Stop a sync instance's thread: its stop future (or ``None``), and whether ``on_stop`` runs
        on that thread (a sync one) rather than on the loop (an async one, or no thread)."""
        if inst.host is None:
            return None, False
        return inst.host.stop(block=False), not inspect.iscoroutinefunction(inst.obj.on_stop)


async def _run_on_stop(inst: Instance) -> None:
    try:
        await run_hook(inst.obj.on_stop)
    except Exception:
        log.exception("%s.on_stop failed", inst.id)
