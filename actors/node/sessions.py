"""A node's side of session state: admitting calls to units it holds, committing, moving units.

Before a call of a ``stateful`` actor runs for session S, this node must hold unit (S, actor):
it holds it if its store has the unit's head; otherwise it claims the unit in placement (a new
session) or pulls it from the holder (migration to here). A call whose future already committed is
answered from the store without running again. After the method returns, its changes commit as the
unit's next version before the caller hears back.

Holding a unit is decided by placement, never by finding its data on disk: a unit this process has
not yet confirmed is claimed (new) or pulled (held elsewhere) before its first call here.

Moving a unit: the destination asks the holder to export it. The holder marks placement
``holder>destination``, stops admitting the unit's calls, waits for the one running, and streams the
records. The destination writes them durably, then swaps the mark for its own name and says so; only
then does the holder drop its copy. If that does not happen in time, the holder swaps the mark back
to itself, and a late destination, finding its swap refused, drops what it wrote.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ...bus import envelope as env
from ...bus.errors import MalformedMessage, StateError, Unavailable
from ...bus.transport import is_no_responders
from ...state import keys as K
from ...state import transfer
from ...state.committer import Commit, Committer, Drop, Put
from ...state.managed import Txn
from ...state.placement import KVPlacement, LocalPlacement, Placement, holder
from ...state.store import Store
from ..runtime import Runtime
from .calls import Answer, Call, Queue

log = logging.getLogger("nalar.sessions")
H_SEQ, H_TOTAL = "Nalar-Seq", "Nalar-Total"
TRANSFER_TIMEOUT = 30.0  # a transfer of 10 MiB takes ~50 ms here; this bounds how long a dead peer stalls calls


class Sessions:
    """This node's ``StateGate``: which units it holds, whose turn it is in each, commits and moves.

    It reaches the rest of the node only through its ports: ``queue`` (a call's turn came),
    ``answer`` (answered from the store, or failed) and ``readmit`` (a call parked during a move
    that failed re-enters: the node's enforcement decides where it goes).
    """

    def __init__(self, name: str, rt: Runtime, store: Store, placement: Placement, queue: Queue,
                 answer: Answer) -> None:
        self.name = name
        self.rt = rt
        self.queue = queue
        self.answer = answer
        self.readmit: Callable[[Call], None] = self.admit
        self.store = store
        self.committer = Committer(store)
        self.placement = placement
        self.held: set[bytes] = set()  # units placement says are ours (checked once per unit)
        self._acquiring: dict[bytes, list[Call]] = {}
        self._bringing: dict[bytes, "asyncio.Future[None]"] = {}  # one claim/pull per unit at a time
        self.moving: dict[bytes, list[Call]] = {}  # units being exported -> calls parked meanwhile
        self.owner: dict[bytes, Call] = {}  # the call whose turn it is, per unit
        self.busy: dict[bytes, list[Call]] = {}  # unit -> calls waiting their turn (stateful order)
        self._idle: dict[bytes, asyncio.Event] = {}
        self._confirm: dict[bytes, "asyncio.Future[bool]"] = {}
        self.pulled = 0
        self.exported = 0

    @classmethod
    async def open(cls, name: str, rt: Runtime, path: str, queue: Queue, answer: Answer) -> "Sessions":
        store = Store(path)
        js = rt.transport.jetstream()
        placement: Placement = LocalPlacement() if js is None else await KVPlacement.open(js, rt.subjects.ns)
        return cls(name, rt, store, placement, queue, answer)

    def close(self) -> None:
        self.committer.stop()
        self.store.close()

    # -- admission ------------------------------------------------------------------------------
    def admit(self, c: Call) -> None:
        """Run ``c`` once its unit is held here and its turn comes; answer it from the store if it committed."""
        u = c.unit
        if u in self.moving:
            self.moving[u].append(c)
            return
        if u not in self.held:
            waiting = self._acquiring.get(u)
            if waiting is not None:
                waiting.append(c)
            else:
                self._acquiring[u] = [c]
                asyncio.get_running_loop().create_task(self._acquire(u))
            return
        try:
            prior = self.store.find_future(c.id)
        except StateError as e:
            self.answer.fail(c, StateError, str(e))
            return
        if prior is not None:  # a retry of a call that already committed: same answer, no second effect
            self.answer.respond(c, True, prior[1])
            return
        if u in self.owner:
            self.busy[u].append(c)
            return
        self.owner[u] = c
        self.busy[u] = []
        self.queue.enqueue(c)

    async def _acquire(self, u: bytes) -> None:
        err: str | None = None
        try:
            await self.bring_here(u)
        except Exception as e:  # the holder is gone, placement is unreachable...: the calls fail clearly
            err = f"cannot bring session state {K.split_unit(u)} to node {self.name}: {e}"
            log.warning("%s", err)
        for c in self._acquiring.pop(u, []):
            if c.done:
                continue
            if err is None:
                self.admit(c)
            else:  # retryable: the holder may be restarting
                self.answer.fail(c, Unavailable, err)

    def release(self, c: Call) -> None:
        """``c`` is answered: if it had its unit's turn, the next waiting call gets it."""
        u = c.unit
        if self.owner.get(u) is not c:  # it never had the turn: just leave the line
            queue = self.busy.get(u)
            if queue is not None and c in queue:
                queue.remove(c)
            return
        queue = self.busy[u]
        while queue:
            nxt = queue.pop(0)
            if not nxt.done:
                self.owner[u] = nxt
                self.queue.enqueue(nxt)
                return
        del self.busy[u]
        del self.owner[u]
        ev = self._idle.pop(u, None)
        if ev is not None:
            ev.set()

    def withdraw(self, u: bytes) -> list[Call]:
        """Take out every call of ``u`` that has not started here (to send them elsewhere), in order."""
        out: list[Call] = []
        owner = self.owner.get(u)
        if owner is not None:
            line = self.busy.get(u, [])
            if owner.inst is None and not owner.committing:  # its turn came but it is still queued
                out.append(owner)
                del self.owner[u]
                self.busy.pop(u, None)
                ev = self._idle.pop(u, None)
                if ev is not None:
                    ev.set()
            out.extend(line)
            line.clear()
        out.extend(self._acquiring.get(u, []))
        self._acquiring.get(u, []).clear()
        parked = self.moving.get(u)
        if parked:
            out.extend(parked)
            parked.clear()
        return [c for c in out if not c.done]

    # -- holding a unit: placement decides, never the mere presence of data ----------------------
    async def bring_here(self, u: bytes, expect_src: str | None = None) -> int:
        """Make this node the unit's holder: claim it if new, or pull it from its holder."""
        if u in self.held:
            return 0
        running = self._bringing.get(u)
        if running is not None:
            await asyncio.shield(running)
            return 0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bringing[u] = fut
        try:
            me = self.name
            if expect_src is None:
                value = await self.placement.claim(u, me)
            else:  # a migrate: the unit must already be placed at its source
                cur = await self.placement.get(u)
                if cur is None:
                    raise StateError(f"{K.split_unit(u)} is not placed anywhere")
                value = cur[0]
            src = holder(value)
            if expect_src is not None and src != expect_src:
                raise StateError(f"{K.split_unit(u)} is held by {src!r}, not {expect_src!r}")
            if src == me:
                if value != me:  # we died while moving it away: take it back (the destination's swap fails)
                    await self.placement.swap(u, value, me)
                self.held.add(u)
                return 0
            return await self._pull(u, src)
        finally:
            self._bringing.pop(u, None)
            if not fut.done():
                fut.set_result(None)

    # -- commit -----------------------------------------------------------------------------------
    def begin(self, c: Call) -> Txn:
        """The transaction ``c``'s managed objects read and write through."""
        return Txn(self.store, c.unit)

    def commit(self, c: Call, writes: dict[str, bytes], body: bytes,
               done: Callable[[Call, Any, bytes], None]) -> None:
        """Commit ``c``'s changes as its unit's next version; ``done(c, outcome, body)`` runs on the loop."""
        def settled(outcome: Any) -> None:
            self.rt.post(done, c, outcome, body)

        assert c.txn is not None
        self.committer.submit(Commit(c.unit, c.id, c.method, c.meta.attempt, dict(c.txn.seen), writes, body, settled))

    # -- moving units -------------------------------------------------------------------------------
    async def export(self, u: bytes, reply: str, to: str) -> None:
        """Holder side of a move: fence it in placement, stream the unit, drop it only once ``to`` holds it."""
        me = self.name

        def refuse(why: str) -> None:
            self.rt.send(reply, env.encode_error(StateError(why).to_wire()))

        if u in self.moving or u in self._bringing:
            refuse(f"{K.split_unit(u)} is already moving")
            return
        if u not in self.held:
            cur = await self.placement.get(u)
            if cur is None or cur[0] != me:
                refuse(f"node {me} does not hold {K.split_unit(u)}")
                return
            self.held.add(u)
        mark = f"{me}>{to}"
        if not await self.placement.swap(u, me, mark):
            refuse(f"placement of {K.split_unit(u)} is not {me!r}")
            return
        parked = self.moving.setdefault(u, [])
        confirmed = self._confirm[u] = asyncio.get_running_loop().create_future()
        moved = False
        try:
            if u in self.owner:  # let its running call commit first
                await self._idle.setdefault(u, asyncio.Event()).wait()
            loop = asyncio.get_running_loop()
            records = await loop.run_in_executor(None, self.store.records, u)
            if not records:  # claimed but never written: an empty unit moves as an empty head
                records = [(K.head(u), b'{"v":0,"o":{}}')]
            data = transfer.pack(records)
            size = max(1024, self.rt.transport.max_payload - env.HEADER_ALLOWANCE)
            parts = transfer.chunks(data, size)
            for i, part in enumerate(parts):
                await self.rt.transport.publish(reply, part, {H_SEQ: str(i), H_TOTAL: str(len(parts))})
            await self.rt.transport.flush()
            try:
                ok = await asyncio.wait_for(asyncio.shield(confirmed), TRANSFER_TIMEOUT)
            except asyncio.TimeoutError:
                ok = False
            if ok:
                cur = await self.placement.get(u)
                moved = cur is not None and cur[0] == to
            if not moved:  # reclaim; if the destination's swap landed first, it has the unit after all
                if not await self.placement.swap(u, mark, me):
                    cur = await self.placement.get(u)
                    moved = cur is not None and cur[0] == to
        except Exception:
            log.exception("export of %s failed", K.split_unit(u))
            if not await self.placement.swap(u, mark, me):
                cur = await self.placement.get(u)
                moved = cur is not None and cur[0] == to
        finally:
            if moved:
                self.held.discard(u)
                try:
                    await self._write(Drop(u, _ignore))
                except StateError:
                    log.exception("dropping %s after it moved", K.split_unit(u))
                self.exported += 1
            self._confirm.pop(u, None)
            self.moving.pop(u, None)
            for c in parked:  # they re-enter: here if the move failed, else they follow their route
                if not c.done:
                    self.readmit(c)

    def confirmed(self, u: bytes, ok: bool) -> None:
        f = self._confirm.get(u)
        if f is not None and not f.done():
            f.set_result(ok)

    async def _pull(self, u: bytes, src: str) -> int:
        """Destination side: fetch the unit, write it durably, then swap placement ``src>me`` to ``me``."""
        rt = self.rt
        me = self.name
        session, actor = K.split_unit(u)
        parts: dict[int, bytes] = {}
        total: list[int] = []
        failure: list[str] = []

        def on(data: bytes, headers: dict[str, str] | None) -> bool:
            try:
                if not headers or H_SEQ not in headers:
                    if is_no_responders(data, headers):
                        failure.append(f"node {src} is not reachable")
                    else:
                        ok, value = env.decode_reply(data)  # the holder refused, with a reason
                        failure.append(str(value.get("message") if isinstance(value, dict) else value))
                    return True
                seq, n = int(headers[H_SEQ]), int(headers[H_TOTAL])
                if not (0 <= seq < n <= 1_000_000):
                    raise ValueError("bad sequence")
            except (MalformedMessage, ValueError, KeyError) as e:
                rt.count_malformed("transfer")
                failure.append(f"malformed transfer message: {e}")
                return True
            parts[seq] = data
            if not total:
                total.append(n)
            return len(parts) >= total[0]

        async def tell(ok: bool) -> None:
            await rt.transport.publish(rt.subjects.node(src), env.dumps(
                {"op": "export_done", "session": session, "actor": actor, "ok": ok}))

        try:
            await rt.scatter(rt.subjects.node(src), {"op": "export", "session": session, "actor": actor, "to": me},
                             on, TRANSFER_TIMEOUT)
        except BaseException:
            await tell(False)
            raise
        if not failure and (not total or len(parts) < total[0]):
            failure.append(f"node {src} did not send {K.split_unit(u)} within {TRANSFER_TIMEOUT:.0f} s")
        try:
            if failure:
                raise StateError(failure[0])
            data = b"".join(parts[i] for i in range(total[0]))
            records = transfer.unpack(data, u)  # validates everything before a byte is written
            await self._write(Put(u, records, _ignore))
            if not await self.placement.swap(u, f"{src}>{me}", me):
                await self._write(Drop(u, _ignore))  # the holder took it back: our copy must not live on
                raise StateError(f"the move of {K.split_unit(u)} was called off by {src}")
        except BaseException:
            await tell(False)
            raise
        self.held.add(u)
        self.pulled += 1
        await tell(True)
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

