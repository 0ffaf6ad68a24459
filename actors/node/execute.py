"""Execution: running a bound call, answering it, and ending it early (cancel, deadline, stop).

An ``async def`` method runs as a task on the node's loop; a ``def`` method on its instance's pykka
thread, handing its outcome back to the loop. A method that returns a future resolves its call with
that future's value. A streaming method (an async generator) sends each item it yields to its
callers as it comes, numbered, and ends with the count as its value. A call that changed session
state commits through the ``StateGate`` before its caller hears back, and one that read it is
checked against the log; a call that lost a race to another node re-runs from the new version.
"""
from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from typing import Any

from ...bus import envelope as env
from ...bus import errors
from ...bus.errors import Cancelled, DeadlineExceeded, RemoteError, StateError
from ...state.managed import current_txn
from ..context import CallScope, current_scope
from ..deadlines import DeadlineWheel
from ..future import DONE, Future
from ..preempt import PREEMPTED, Preempted
from ..runtime import Runtime
from . import faillog, spans
from .batch import Batch, Batcher
from .batch_run import BatchRuns
from .preempting import MAX_PREEMPTIONS, Preemption
from .calls import Book, Call, Instance, Queue, StateGate
from .hosting import Hosting

#: Times a call whose commit lost a race to another node's is re-run before it fails with ``Conflict``.
MAX_CONFLICT_RETRIES = 64


class Executor(BatchRuns, Preemption):
    """Runs bound calls and answers them (the ``Answer`` port); owns the node's deadline wheel."""

    def __init__(self, book: Book, rt: Runtime) -> None:
        self.book = book
        self.rt = rt
        self.hosting = Hosting(book, self.run_sync)
        self.queue: Queue | None = None  # wired by the node (the scheduler hands calls to ``dispatch``)
        self.state: StateGate | None = None  # session state, on a node hosting stateful actors
        self.wheel = DeadlineWheel(self.expire)
        self.batcher = Batcher(self.run_batch)
        self._running: dict[str, set[Call]] = {}  # preemptable actors' running calls, by actor
        self._preempting: set[str] = set()  # ids of the calls told to give their instance up
        self._streaming: set[str] = set()  # ids of streaming calls that sent an item (never preempted)

    # -- starting ---------------------------------------------------------------------------------
    def dispatch(self, inst: Instance, c: Call) -> None:
        """Start ``c`` on ``inst`` (the scheduler's ``start``); a batchable call joins a batch instead."""
        g = inst.group
        if c.unit and self.state is not None:
            c.txn = self.state.begin(c)
            if c.txn is None:  # another attempt of it committed while it waited its turn: answered
                if c.qspan is not None:
                    spans.dequeued(c)
                return
        if c.method in g.batched:
            self._bind(inst, c)
            if self.batcher.add(inst, c):
                inst.running += 1  # the batch's slot: the calls that join it ride along
            return
        inst.running += 1
        if c.cost > 0:
            inst.spent += c.cost
        self._bind(inst, c)
        if g.hints.preemptable:
            self._running.setdefault(g.name, set()).add(c)
        if g.methods[c.method]:
            run = self.run_stream if c.method in g.streams else self.run_async
            c.begun = False  # (a re-run's new task)
            c.task = asyncio.get_running_loop().create_task(run(inst, c))
            return
        inst.sync_running += 1
        self.hosting.tell(inst, c)

    def _bind(self, inst: Instance, c: Call) -> None:
        """``c`` is on ``inst`` now: out of the queue's books, with its scope and its wait counted."""
        c.inst = inst
        if c.qspan is not None:
            spans.dequeued(c)
        g = inst.group
        m = c.meta
        c.data = None  # it will not be forwarded now: do not keep its bytes while it runs
        if c.scope is None:  # a re-run (its commit lost a race) keeps its scope: one call, one set of children
            c.scope = CallScope(m.id, m.request, m.session, m.priority, m.deadline, m.stage, m.born, g.name,
                                bool(c.unit), c.otel_ctx, svc=m.svc)
        if c.arrived:
            c.started = g.waited(c.arrived)
        if m.session is not None and g.kind == "model":
            g.served(m.session, inst)

    async def run_async(self, inst: Instance, c: Call) -> None:
        c.begun = True
        current_scope.set(c.scope)
        current_txn.set(c.txn)
        try:
            value = await getattr(inst.obj, c.method)(*c.args, **c.kwargs)
            ok = True
        except asyncio.CancelledError:
            value, ok = None, False
        except BaseException as e:  # SystemExit or KeyboardInterrupt from user code is its error, not ours
            value, ok = errors.to_wire(e, inst.group.name, c.method, c.id), False
        self.complete(inst, c, ok, value)

    async def run_stream(self, inst: Instance, c: Call) -> None:
        """A streaming method: each item goes to the callers at once; the value is how many there were,
        so a caller can tell it missed none."""
        c.begun = True
        current_scope.set(c.scope)
        current_txn.set(c.txn)
        n = 0
        value: Any
        try:
            items = getattr(inst.obj, c.method)(*c.args, **c.kwargs)
            try:
                async for item in items:
                    if c.done:  # cancelled, or its deadline passed: the task is being cancelled too
                        break
                    self._send_item(c, n, item)
                    n += 1
            finally:
                await items.aclose()  # a model's stream closed here aborts its engine request
            value, ok = n, True
        except asyncio.CancelledError:
            value, ok = None, False
        except BaseException as e:
            value, ok = errors.to_wire(e, inst.group.name, c.method, c.id), False
        self.complete(inst, c, ok, value)

    def _send_item(self, c: Call, n: int, item: Any) -> None:
        """One item of a stream (non-JSON or over the payload limit: the call fails with that error)."""
        data = env.encode_result(item)
        headers = {env.H_ID: c.id, env.H_CHUNK: str(n)}
        if n == 0:
            self._streaming.add(c.id)
        env.check_size(data, headers, self.rt.transport.max_payload, f"item {n} of {c.group.name}.{c.method}")
        if c.reply:
            self.rt.send(c.reply, data, headers)
        for r in c.retry_replies or ():
            self.rt.send(r, data, headers)

    def run_sync(self, inst: Instance, c: Call) -> None:
        """Runs on the instance's own thread."""
        if isinstance(c, Batch):
            self._run_batch_sync(c)
            return
        if c.done:  # cancelled or expired while it sat in the mailbox
            self.rt.post(self.complete, inst, c, False, None)
            return
        token = current_scope.set(c.scope)
        ttoken = current_txn.set(c.txn)
        try:
            value = getattr(inst.obj, c.method)(*c.args, **c.kwargs)
            ok = True
        except Preempted:  # asked or not (a stale request of the actor's own): it gives its instance up
            value, ok = PREEMPTED, False
        except BaseException as e:  # never let pykka see SystemExit & co: it would stop every actor
            value, ok = errors.to_wire(e, inst.group.name, c.method, c.id), False
        finally:
            current_txn.reset(ttoken)
            current_scope.reset(token)
        self.rt.post(self.complete, inst, c, ok, value)

    # -- finishing --------------------------------------------------------------------------------
    def complete(self, inst: Instance, c: Call, ok: bool, value: Any) -> None:
        """The method returned (on the loop): free its slot, answer it, give the slot the next call."""
        inst.running -= 1
        if c.cost > 0:
            inst.spent -= c.cost
        g = inst.group
        if not g.methods[c.method]:
            inst.sync_running -= 1
        inst.handled += 1
        if c.arrived:
            g.ran(c.arrived, c.started)
        running = self._running.get(g.name)
        if running is not None:
            running.discard(c)
        preempted = not ok and not c.done and (c.id in self._preempting or value is PREEMPTED)
        self._preempting.discard(c.id)
        self._streaming.discard(c.id)
        if preempted and c.scope is not None and c.scope.preemptions >= MAX_PREEMPTIONS:
            preempted, value = False, RemoteError(
                "Preempted", f"preempted {MAX_PREEMPTIONS} times, and raised Preempted again; no more re-runs",
                g.name, c.method, future_id=c.id).to_wire()
        if preempted:
            self._requeue(c)  # (before the pump below: the slot goes to the call it was preempted for)
        elif not c.done:
            if ok and isinstance(value, Future):
                value.add_done_callback(partial(self._chained, c))
            else:
                self._finish(c, ok, value)
        self.freed(inst)

    def freed(self, inst: Instance) -> None:
        """A slot of ``inst`` is free: a drained instance retires once idle, another takes its next call."""
        if inst.draining:
            if inst.running == 0:
                self.hosting.retire(inst)
        elif inst.queued or inst.group.shared:
            assert self.queue is not None
            self.queue.pump(inst)

    def _chained(self, c: Call, f: Future[Any]) -> None:
        """The method returned a future: its value (or error) becomes this call's."""
        if not self.rt.on_loop():
            self.rt.post(self._chained, c, f)
            return
        if f._state == DONE:
            self._finish(c, True, f._value)
            return
        err = f._value
        wire = (errors.to_wire(err, c.group.name, c.method, c.id) if isinstance(err, BaseException)
                else RemoteError("Exception", str(err), c.group.name, c.method, future_id=c.id).to_wire())
        self._finish(c, False, wire)

    def _finish(self, c: Call, ok: bool, value: Any) -> None:
        """The method is done: encode its answer, commit its state changes first if it made any."""
        if c.done or c.committing:
            return
        if ok:
            try:
                data = env.encode_result(value)
                env.check_size(data, {env.H_ID: c.id}, self.rt.transport.max_payload,
                               f"the result of {c.group.name}.{c.method}")
                writes = c.txn.changes() if c.txn is not None else None
            except (TypeError, ValueError) as e:
                ok, value = False, RemoteError(type(e).__name__, str(e), c.group.name, c.method,
                                               future_id=c.id).to_wire()
            else:
                if writes:
                    assert self.state is not None
                    c.committing = True
                    self.state.commit(c, writes, data, self.committed)
                    return
                if c.txn is not None and c.txn.loaded:  # it read state: was its copy current?
                    assert self.state is not None
                    c.committing = True
                    self.state.verify(c, data, self.committed)
                    return
        if not ok:
            if value is None:
                value = Cancelled("cancelled", actor=c.group.name, method=c.method, future_id=c.id).to_wire()
            data = env.encode_error(value)
        self.respond(c, ok, data, value)

    def committed(self, c: Call, outcome: Any, body: bytes) -> None:
        """The commit's outcome (on the loop): answer, or re-run the call if it lost a race."""
        c.committing = False
        kind = outcome[0]
        if kind == "ok":
            self.respond(c, True, body)
        elif kind == "duplicate":  # an earlier attempt committed first: its answer stands
            self.respond(c, True, outcome[2])
        elif kind == "conflict" and c.conflicts < MAX_CONFLICT_RETRIES and not c.done:
            c.conflicts += 1
            c.txn = None
            c.inst = None
            # from its new base version, after a random pause that grows: two nodes racing on one
            # session then stop colliding
            delay = random.uniform(0, min(0.05, 0.001 * 2 ** c.conflicts))
            asyncio.get_running_loop().call_later(delay, self._rerun, c)
        else:
            err = outcome[1]
            if not isinstance(err, RemoteError):
                err = StateError(str(err))
            err.actor, err.method, err.future_id = c.group.name, c.method, c.id
            wire = err.to_wire()
            self.respond(c, False, env.encode_error(wire), wire)

    def _rerun(self, c: Call) -> None:
        if c.done:
            return
        if c.meta.deadline and time.time() >= c.meta.deadline:  # nothing committed, and none will be
            self.fail(c, DeadlineExceeded, "the call's deadline passed while it waited to run again "
                      "(another node committed its session first); nothing was committed")
            return
        assert self.queue is not None
        if c.unit and self.state is not None:  # the winner went on committing during the pause
            self.state.refresh(c, self.queue.enqueue)
            return
        self.queue.enqueue(c)

    # -- answering ----------------------------------------------------------------------------------
    def fail(self, c: Call, err: type[RemoteError], message: str) -> None:
        wire = err(message, actor=c.group.name, method=c.method, future_id=c.id).to_wire()  # type: ignore[call-arg]
        self.respond(c, False, env.encode_error(wire), wire)

    def respond(self, c: Call, ok: bool, data: bytes, value: Any = None) -> None:
        """Send the answer (to every caller waiting on this id) and forget the call."""
        if c.done:
            return
        c.done = True
        scope = c.scope
        if scope is not None:
            scope.closed = True
            scope.children = None
        book = self.book
        book.active.pop(c.id, None)
        if c.wk:
            self.wheel.discard(c.wk, c)
        g = c.group
        if ok:
            book.counters["done"] += 1
            g.done += 1
        else:
            book.counters["failed"] += 1
            g.failed += 1
            if c.meta.session is not None:
                book.note_failure(c.meta.session)
            g.count_error(value)
            faillog.failed(g.name, c.method, c.meta, value if isinstance(value, dict) else None, book.name)
        headers = {env.H_ID: c.id}
        if self.rt.table.order:  # program-level scheduling: the service this call's subtree received
            headers[env.H_SVC] = str(service_of(c))
        if ok and c.method in g.streams:
            headers[env.H_STREAM] = "end"  # the value is the count: the caller checks it got them all
        if c.reply:
            self.rt.send(c.reply, data, headers)
        for r in c.retry_replies or ():
            self.rt.send(r, data, headers)
        if c.span is not None:
            spans.finish(c, ok, value if isinstance(value, dict) else None)
        if c.unit and self.state is not None:
            self.state.release(c)
        if not book.active:
            book.idle.set()

    def reject(self, c: Call, err: type[RemoteError], message: str) -> None:
        """Refuse a call that was never accepted (nothing to forget)."""
        self.book.counters["rejected"] += 1
        wire = err(message, actor=c.group.name, method=c.method, future_id=c.id).to_wire()  # type: ignore[call-arg]
        c.group.count_error(wire)
        faillog.failed(c.group.name, c.method, c.meta, wire, self.book.name)
        if c.reply:
            self.rt.send(c.reply, env.encode_error(wire), {env.H_ID: c.id})

    def forget(self, c: Call, handed_to: str) -> None:
        """``c`` went to another node, which answers it: this node is finished with it."""
        c.done = True
        self.book.active.pop(c.id, None)
        if c.wk:
            self.wheel.discard(c.wk, c)
        if c.span is not None:
            spans.finish(c, True, handed_to=handed_to)
        if not self.book.active:
            self.book.idle.set()

    # -- ending early ---------------------------------------------------------------------------------
    def arm(self, c: Call) -> None:
        """``c`` is accepted: it is in flight, and its deadline will end it."""
        self.book.active[c.id] = c
        c.wk = self.wheel.add(c.meta.deadline, c)

    def abort(self, c: Call, err: type[RemoteError], message: str) -> None:
        """End ``c`` now with ``err``: out of its queue or its task cancelled, its children cancelled."""
        if c.done or c.committing:  # a commit under way finishes (quickly) and is answered
            return
        unstarted = None
        if c.inst is None:
            assert self.queue is not None
            self.queue.unqueue(c)
        elif c.task is not None:
            c.task.cancel()
            if not c.begun:  # cancelled before its first step: its method never runs, nor says it ended
                unstarted = c.inst
        children = c.scope.children if c.scope is not None else None
        self.fail(c, err, message)
        if unstarted is not None:
            self.complete(unstarted, c, False, None)  # (its slot back)
        for child in children or ():
            child.cancel()

    def expire(self, c: Call) -> None:
        if not c.done:
            self.book.counters["expired"] += 1
            self.abort(c, DeadlineExceeded, "the call's deadline passed while it was queued or running")

    def cancel(self, ids: list[str]) -> None:
        for fid in ids:
            c = self.book.active.get(fid)
            if c is not None:
                self.book.counters["cancelled"] += 1
                self.abort(c, Cancelled, "cancelled by its caller")


def service_of(c: Call) -> int:
    """The service ``c``'s subtree received, µs: along its children's critical path if it made any
    (its own time then is mostly waiting for them), else its run time on its instance."""
    scope = c.scope
    if scope is not None and scope.svc > scope.svc_base:
        return min(env.MAX_SVC, scope.svc - scope.svc_base)
    return int((time.monotonic() - c.started) * 1_000_000) if c.started else 0
