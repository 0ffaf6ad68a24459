"""A node's side of session state: admitting calls to units it holds, committing, moving units.

Before a call of a ``stateful`` actor runs for session S, this node must hold unit (S, actor):
it holds it if its store has the unit's head; otherwise it claims the unit in placement (a new
session) or pulls it from the holder (migration to here). A call whose future already committed is
answered from the store without running again. After the method returns, its changes commit as the
unit's next version before the caller hears back.

Moving a unit (``migrate``): the destination asks the holder to export it; the holder stops
admitting calls of that unit, waits for the ones running, streams its records, and drops its copy
only after the destination has written them durably and switched placement.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from ..bus import envelope as env
from ..bus.errors import MalformedMessage, StateError
from ..bus.transport import LocalTransport, NatsTransport
from ..state import keys as K
from ..state import transfer
from ..state.committer import Commit, Committer, Drop, Put
from ..state.placement import KVPlacement, LocalPlacement, Placement
from ..state.store import Store

if TYPE_CHECKING:
    from .node import Call, Node

log = logging.getLogger("nalar.sessions")
H_SEQ, H_TOTAL = "Nalar-Seq", "Nalar-Total"
TRANSFER_TIMEOUT = 120.0


class Sessions:
    def __init__(self, node: "Node", store: Store, placement: Placement) -> None:
        self.node = node
        self.rt = node.rt
        self.store = store
        self.committer = Committer(store)
        self.placement = placement
        self.held: set[bytes] = set()
        self._acquiring: dict[bytes, list["Call"]] = {}
        self.moving: dict[bytes, list["Call"]] = {}
        self.busy: dict[bytes, list["Call"]] = {}  # unit -> calls waiting their turn (stateful order)
        self._idle: dict[bytes, asyncio.Event] = {}
        self._confirm: dict[bytes, "asyncio.Future[bool]"] = {}
        self.pulled = 0
        self.exported = 0

    @classmethod
    async def open(cls, node: "Node", path: str) -> "Sessions":
        store = Store(path)
        t = node.rt.transport
        placement: Placement
        if isinstance(t, NatsTransport):
            placement = await KVPlacement.open(t.nc, node.rt.subjects.ns)
        else:
            assert isinstance(t, LocalTransport)
            placement = LocalPlacement()
        return cls(node, store, placement)

    def close(self) -> None:
        self.committer.stop()
        self.store.close()

    # -- admission ------------------------------------------------------------------------------
    def admit(self, c: "Call") -> None:
        """Run ``c`` when its unit is here and its turn comes; answer it from the store if it committed."""
        u = c.unit
        if u in self.moving:
            self.moving[u].append(c)
            return
        if u not in self.held:
            try:
                here = self.store.head(u) is not None
            except StateError as e:
                self.node._fail_call(c, "state", "StateError", str(e))
                return
            if not here:
                waiting = self._acquiring.get(u)
                if waiting is not None:
                    waiting.append(c)
                else:
                    self._acquiring[u] = [c]
                    asyncio.get_running_loop().create_task(self._acquire(u))
                return
            self.held.add(u)
        try:
            prior = self.store.find_future(c.id)
        except StateError as e:
            self.node._fail_call(c, "state", "StateError", str(e))
            return
        if prior is not None:  # a retry of a call that already committed: same answer, no second effect
            self.node._respond(c, True, prior[1])
            return
        queue = self.busy.get(u)
        if queue is not None:
            queue.append(c)
            return
        self.busy[u] = []
        self.node._enqueue(c)

    async def _acquire(self, u: bytes) -> None:
        err: str | None = None
        try:
            holder = await self.placement.claim(u, self.node.name)
            if holder != self.node.name:
                await self.pull(u, holder)
            self.held.add(u)
        except Exception as e:  # the holder is gone, placement is unreachable...: the calls fail clearly
            err = f"cannot bring session state {K.split_unit(u)} to node {self.node.name}: {e}"
            log.warning("%s", err)
        calls = self._acquiring.pop(u, [])
        for c in calls:
            if c.done:
                continue
            if err is None:
                self.admit(c)
            else:  # retryable: the holder may be restarting
                self.node._fail_call(c, "unavailable", "Unavailable", err)

    def release(self, c: "Call") -> None:
        """``c`` is answered: let the next call of its unit in."""
        u = c.unit
        queue = self.busy.get(u)
        if queue is None:
            return
        while queue:
            nxt = queue.pop(0)
            if not nxt.done:
                self.node._enqueue(nxt)
                return
        del self.busy[u]
        ev = self._idle.pop(u, None)
        if ev is not None:
            ev.set()

    # -- commit -----------------------------------------------------------------------------------
    def commit(self, c: "Call", writes: dict[str, bytes], body: bytes) -> None:
        def done(outcome: Any) -> None:
            self.rt.post(self.node._committed, c, outcome, body)

        self.committer.submit(Commit(c.unit, c.id, c.method, c.attempt, dict(c.txn.seen), writes, body, done))

    # -- moving units -------------------------------------------------------------------------------
    async def export(self, u: bytes, reply: str, to: str) -> None:
        """Holder side: stream the unit to ``reply``; drop it once the destination confirms."""
        if u not in self.held and self.store.head(u) is None:
            self.rt.send(reply, env.encode_error({"kind": "state", "type": "StateError",
                                                  "message": f"node {self.node.name} does not hold {K.split_unit(u)}"}))
            return
        parked = self.moving.setdefault(u, [])
        try:
            if u in self.busy:  # wait for its running calls to commit
                ev = self._idle.setdefault(u, asyncio.Event())
                await ev.wait()
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(None, lambda: transfer.pack(self.store.records(u)))
            size = max(1024, self.rt.transport.max_payload - 4096)
            parts = transfer.chunks(data, size)
            for i, part in enumerate(parts):
                await self.rt.transport.publish(reply, part, {H_SEQ: str(i), H_TOTAL: str(len(parts))})
            await self.rt.transport.flush()
            confirmed = self._confirm.setdefault(u, asyncio.get_running_loop().create_future())
            try:
                moved = await asyncio.wait_for(asyncio.shield(confirmed), TRANSFER_TIMEOUT)
            except asyncio.TimeoutError:
                cur = await self.placement.get(u)
                moved = cur is not None and cur[0] == to
            if moved:
                await self._write(Drop(u, _ignore))
                self.held.discard(u)
                self.exported += 1
        finally:
            self._confirm.pop(u, None)
            self.moving.pop(u, None)
            for c in parked:  # they re-enter: here if the move failed, else they pull from the new holder
                if not c.done:
                    self.admit(c)

    def confirmed(self, u: bytes) -> None:
        f = self._confirm.get(u)
        if f is not None and not f.done():
            f.set_result(True)

    async def pull(self, u: bytes, src: str) -> int:
        """Destination side: fetch the unit from ``src``, write it durably, take placement, confirm."""
        rt = self.rt
        inbox = rt.subjects.inbox(rt.proc, f"pull{time.monotonic_ns():x}")
        parts: dict[int, bytes] = {}
        total: list[int] = []
        got = asyncio.Event()
        failure: list[str] = []

        def on(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            try:
                if not headers or H_SEQ not in headers:
                    ok, value = env.decode_reply(data)  # the holder answered with an error
                    failure.append(str(value.get("message") if isinstance(value, dict) else value))
                    got.set()
                    return
                seq, n = int(headers[H_SEQ]), int(headers[H_TOTAL])
                if not (0 <= seq < n <= 1_000_000):
                    raise ValueError("bad sequence")
            except (MalformedMessage, ValueError) as e:
                rt.count_malformed("transfer")
                failure.append(f"malformed transfer message: {e}")
                got.set()
                return
            parts[seq] = data
            if not total:
                total.append(n)
            if len(parts) >= total[0]:
                got.set()

        sub = await rt.transport.subscribe(inbox, on)
        session, actor = K.split_unit(u)
        try:
            body = env.dumps({"op": "export", "session": session, "actor": actor, "to": self.node.name})
            await rt.transport.publish(rt.subjects.node(src), body, None, inbox)
            try:
                await asyncio.wait_for(got.wait(), TRANSFER_TIMEOUT)
            except asyncio.TimeoutError:
                raise StateError("StateError", f"node {src} did not send {K.split_unit(u)} within "
                                               f"{TRANSFER_TIMEOUT:.0f} s") from None
        finally:
            await sub.unsubscribe()
        if failure:
            raise StateError("StateError", failure[0])
        data = b"".join(parts[i] for i in range(total[0]))
        records = transfer.unpack(data, u)  # validates everything before a byte is written
        await self._write(Put(u, records, _ignore))
        if not await self.placement.move(u, src, self.node.name):
            raise StateError("StateError", f"placement of {K.split_unit(u)} changed during the move")
        self.held.add(u)
        self.pulled += 1
        await rt.transport.publish(rt.subjects.node(src), env.dumps({"op": "export_done", "session": session,
                                                                        "actor": actor}))
        return len(data)

    async def _write(self, op: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        op.done = lambda out: loop.call_soon_threadsafe(_settle, fut, out)
        self.committer.submit(op)
        out = await fut
        if out[0] != "ok":
            raise out[1]
        return out[1]

    def units_of(self, session: str) -> list[str]:
        return self.store.units_of(session)


def _settle(fut: "asyncio.Future[Any]", out: Any) -> None:
    if not fut.done():
        fut.set_result(out)


def _ignore(_: Any) -> None:
    pass


Done = Callable[[Any], None]
