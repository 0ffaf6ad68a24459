"""Running a batch (``batch.py`` forms them): one invocation of the method for all its calls, then
each call answered with its own result or error. A part of the executor (``Executor`` mixes it in).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from ...bus import errors
from ..runtime import Runtime
from .batch import Batch
from .calls import Call, Instance, Queue
from .hosting import Hosting


class BatchRuns:
    """The executor's batch path; the executor provides ``rt``, ``hosting``, ``queue`` and ``_finish``."""

    rt: Runtime
    hosting: Hosting
    queue: Queue | None

    def _finish(self, c: Call, ok: bool, value: Any) -> None:
        raise NotImplementedError

    def freed(self, inst: Instance) -> None:
        raise NotImplementedError

    def run_batch(self, b: Batch) -> None:
        """A batch is ready (``Batcher``): one invocation of its method for all its calls."""
        inst = b.inst
        if not b.calls:  # every call ended while it formed
            self._batch_done(b, True, [])
            return
        if inst.group.methods[b.method]:
            b.task = asyncio.get_running_loop().create_task(self._run_batch_async(b))
            b.task.add_done_callback(lambda t: self._batch_done(b, False, None) if t.cancelled() else None)
            return
        inst.sync_running += 1
        self.hosting.tell(inst, b)  # type: ignore[arg-type]  # run_sync knows a batch

    async def _run_batch_async(self, b: Batch) -> None:
        args, kwargs = b.columns()
        try:
            value = await getattr(b.inst.obj, b.method)(*args, **kwargs)
            ok = True
        except asyncio.CancelledError:
            value, ok = None, False
        except BaseException as e:
            value, ok = e, False
        self._batch_done(b, ok, value)

    def _run_batch_sync(self, b: Batch) -> None:
        """On the instance's own thread."""
        args, kwargs = b.columns()
        try:
            value = getattr(b.inst.obj, b.method)(*args, **kwargs)
            ok = True
        except BaseException as e:
            value, ok = e, False
        self.rt.post(self._batch_done, b, ok, value)

    def _batch_done(self, b: Batch, ok: bool, value: Any) -> None:
        """The batch's invocation returned (on the loop): each call gets its own result or error."""
        inst, g = b.inst, b.inst.group
        b.done = True
        inst.running -= 1
        if b.calls and not g.methods[b.method]:
            inst.sync_running -= 1
        inst.handled += len(b.calls)
        n = len(b.calls)
        if ok and (not isinstance(value, (list, tuple)) or len(value) != n):
            got = f"{len(value)} results" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
            ok, value = False, TypeError(f"{g.name}.{b.method} is batchable: it must return one result per call "
                                         f"in its batch, in order (a list of {n}), not {got}")
        now = time.monotonic()
        for i, c in enumerate(b.calls):
            if c.arrived:
                g.run_hist.observe((now - c.started) * 1000, now)
            if c.done:
                continue
            item = value[i] if ok else value
            if ok and not isinstance(item, BaseException):
                self._finish(c, True, item)
            elif isinstance(item, BaseException):
                self._finish(c, False, errors.to_wire(item, g.name, c.method, c.id))
            else:  # cancelled (the node is stopping)
                self._finish(c, False, None)
        self.freed(inst)
