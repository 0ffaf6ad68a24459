"""A node's side of session state: admitting stateful calls, committing them through the log.

The unit's log (``state.log``) decides the order of its versions; this node's LMDB holds a copy. A
call of a ``stateful`` actor for session S runs on the copy of unit (S, actor): caught up from the log
the first time this process touches the unit, then kept current by its own commits. Its changes are
appended to the log on the sequence the copy was at when it began; only once the log acknowledges
the append is the caller answered. If another node committed first, the append is refused, the copy
catches up, and the call runs again on the new version (or, if the other commit was this very future
retried, is answered with that commit's reply). A call that changed nothing but read state is checked
against the log the same way before it is answered, so no node answers from a stale copy. Any node
can therefore serve any unit, a restarted node (with its disk or on an empty one) catches up instead
of starting over, and where a session's calls go is a question of locality only.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from ...bus import envelope as env
from ...bus.errors import Conflict, DeadlineExceeded, StateError, StateFull, Unavailable, public_text
from ...state import keys as K
from ...state.committer import Apply, Committer, Entry
from ...state.log import Fenced, JetStreamLog, LocalLog, UnitLog, Unreachable
from ...state.managed import Txn
from ...state.record import Change
from ...state.store import Store
from ...state.sync import NotApplied, Pending, UnitSync
from ...state.upgrade import OldUnit, is_old_store, read_old_store
from ..runtime import Runtime
from .calls import Answer, Call, Queue
from . import spans

log = logging.getLogger("nalar.sessions")
Done = Callable[[Call, Any, bytes], None]


class Sessions:
    """This node's ``StateGate``: which units it has caught up, whose turn it is in each, commits; it
    reaches the node only through ``queue`` (a call's turn came) and ``answer`` (answered or failed)."""

    def __init__(self, name: str, rt: Runtime, store: Store, unit_log: UnitLog, queue: Queue,
                 answer: Answer) -> None:
        self.name = name
        self.rt = rt
        self.queue = queue
        self.answer = answer
        self.store = store
        self.committer = Committer(store)
        self.log = unit_log
        self.sync = UnitSync(name, unit_log, store, self.committer, rt.transport.max_payload - env.HEADER_ALLOWANCE,
                             rt.post)
        self.checks_reads = not isinstance(unit_log, LocalLog)  # one process: its copy is the only one
        self.known: set[bytes] = set()  # units this process caught up: its copy follows their log
        self._syncing: dict[bytes, list[Call]] = {}
        self._applying: dict[bytes, "asyncio.Future[None]"] = {}  # units whose own commit this copy is taking
        self.owner: dict[bytes, Call] = {}  # the call whose turn it is, per unit
        self.busy: dict[bytes, list[Call]] = {}  # unit -> calls waiting their turn (stateful order)
        self.counts = {"conflicts": 0, "stale_reads": 0, "unknown": 0, "answered_from_log": 0}

    @classmethod
    async def open(cls, name: str, rt: Runtime, path: str, queue: Queue, answer: Answer,
                   replicas: int | None = None) -> "Sessions":
        old: list[OldUnit] = []
        if is_old_store(path):  # written before the log: set aside, its units go into the log below
            old = read_old_store(path)
            aside = f"{path}.layout1-{int(time.time())}"
            os.rename(path, aside)
            log.warning("node %s: the state store was written before the log; it is kept at %s and its %d "
                        "units go into the log (where the log has none of them yet)", name, aside, len(old))
        store = Store(path)
        try:
            js = rt.transport.jetstream()
            unit_log: UnitLog
            lmdb_only = os.environ.get("NALAR_STATE_LOG", "").strip().lower() == "lmdb-only"
            if js is None or lmdb_only:
                if js is not None:
                    log.warning("NALAR_STATE_LOG=lmdb-only: node %s keeps session state in its LMDB alone (no "
                                "log, no replication); run one such node per namespace, never several", name)
                unit_log = LocalLog(lambda u: (store.head(u) or {"s": 0})["s"])
            else:
                unit_log = await JetStreamLog.open(js, getattr(rt.transport, "nc"), rt.subjects.ns, replicas, rt.ask)
        except BaseException:
            store.close()
            raise
        gate = cls(name, rt, store, unit_log, queue, answer)
        for unit in old:
            try:
                await gate.sync.seed(unit)
            except BaseException:
                gate.close()
                raise
        return gate

    def close(self) -> None:
        self.committer.stop()
        self.store.close()

    # -- admission ------------------------------------------------------------------------------
    def admit(self, c: Call) -> None:
        """Run ``c`` once its unit's copy is current and its turn comes; answer it if it committed."""
        u = c.unit
        if u not in self.known:
            waiting = self._syncing.get(u)
            if waiting is not None:
                waiting.append(c)
            else:
                self._syncing[u] = [c]
                asyncio.get_running_loop().create_task(self._first_sync(u))
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

    async def _first_sync(self, u: bytes) -> None:
        err: tuple[type[Any], str] | None = None
        try:
            await self.bring_here(u)
        except Exception as e:
            # Unreachable is retryable (a leader election, a reconnect); StateFull stays StateFull (the
            # operator's cue is the disk). The caller hears what happened; the node's name and the full
            # error stay in its log.
            kind = Unavailable if isinstance(e, Unreachable) else type(e) if isinstance(e, StateError) else StateError
            err = (kind, f"cannot catch up session state {K.split_unit(u)}: {public_text(e)}")
            log.warning("node %s: cannot catch up session state %s (futures %s): %r", self.name, K.split_unit(u),
                        [c.id for c in self._syncing.get(u, ())], e)
        for c in self._syncing.pop(u, []):
            if c.done:
                continue
            if err is None:
                self.admit(c)
            else:
                self.answer.fail(c, err[0], err[1])

    async def bring_here(self, u: bytes, expect_src: str | None = None) -> int:
        """Catch this node's copy of ``u`` up with its log (a migration's prefetch): the bytes read."""
        n = await self.sync.catch_up(u)
        self.known.add(u)
        return n

    def release(self, c: Call) -> None:
        """``c`` is answered: if it had its unit's turn, the next waiting call gets it (once this node's
        copy has taken ``c``'s commit)."""
        u = c.unit
        if self.owner.get(u) is not c:  # it never had the turn: just leave the line
            line = self.busy.get(u)
            if line is not None and c in line:
                line.remove(c)
            return
        applying = self._applying.get(u)
        if applying is not None:
            applying.add_done_callback(lambda _: self._pass_turn(u, c))
            return
        self._pass_turn(u, c)

    def _pass_turn(self, u: bytes, c: Call) -> None:
        if self.owner.get(u) is not c:
            return
        if u not in self.known:  # the copy could not take the commit: the next call catches up first
            line = self.busy.pop(u, [])
            del self.owner[u]
            for nxt in line:
                if not nxt.done:
                    self.admit(nxt)
            return
        line = self.busy[u]
        while line:
            nxt = line.pop(0)
            if not nxt.done:
                self.owner[u] = nxt
                self.queue.enqueue(nxt)
                return
        del self.busy[u]
        del self.owner[u]

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
            out.extend(line)
            line.clear()
        waiting = self._syncing.get(u)
        if waiting:
            out.extend(waiting)
            waiting.clear()
        return [c for c in out if not c.done]

    # -- commit -----------------------------------------------------------------------------------
    def begin(self, c: Call) -> Txn | None:
        """The transaction ``c`` runs in (on the copy as it is now); ``None`` if the copy already holds
        ``c``'s own commit: another attempt committed elsewhere while it waited its turn, and the copy
        took it in a catch-up. Run on that base its append would not be fenced (the effect twice), so
        it is answered soon with that commit's reply (not from inside the scheduler's start)."""
        try:
            prior = self.store.find_future(c.id)
        except StateError as e:
            asyncio.get_running_loop().call_soon(self._answer_prior, c, None, str(e))
            return None
        if prior is None:
            return Txn(self.store, c.unit)
        self.counts["answered_from_log"] += 1
        asyncio.get_running_loop().call_soon(self._answer_prior, c, prior[1], "")
        return None

    def _answer_prior(self, c: Call, reply: bytes | None, error: str) -> None:
        if not c.done:
            self.answer.fail(c, StateError, error) if reply is None else self.answer.respond(c, True, reply)

    def commit(self, c: Call, changes: list[tuple[Change, bytes]], body: bytes, done: Done) -> None:
        """Append ``c``'s changes to its unit's log, apply them here; then ``done(c, outcome, body)``.

        The common case (one message, the log answers at once) runs on callbacks alone; anything
        else (a retry through an election, a record in parts) goes on in a task.
        """
        assert c.txn is not None
        if c.otel_ctx is not None:  # traced: a span for the commit, closed with its version
            done = spans.commit(c, len(changes), done)
        if c.meta.deadline and time.time() >= c.meta.deadline:  # its caller has given up: commit nothing
            done(c, ("error", DeadlineExceeded("the call's deadline passed before its commit; nothing was "
                                               "committed")), body)
            return
        try:
            p = self.sync.prepare(c.unit, c.txn.base, c.id, c.method, c.meta.attempt, changes, body)
        except Exception as e:  # garbage in this node's copy: nothing was appended
            done(c, ("error", self._failed(c, "cannot prepare the commit; nothing was committed", e)), body)
            return
        quick = None
        if len(p.parts) == 1 and isinstance(self.log, JetStreamLog):
            data, headers = p.parts[0]
            quick = self.log.quick_append(p.unit, p.expected, data, headers, p.msg_id)
        if quick is None:
            asyncio.get_running_loop().create_task(self._commit(c, p, body, done))
        else:
            quick.add_done_callback(lambda f: self._quick_acked(c, p, f, body, done))

    def _quick_acked(self, c: Call, p: Pending, f: "asyncio.Future[Any]", body: bytes, done: Done) -> None:
        assert isinstance(self.log, JetStreamLog)
        seq = None
        fenced = False
        try:
            got, headers = f.result()
            seq = self.log.ack_seq(self.log.decode_answer(got, headers))
        except Fenced:
            fenced = True
        except (Exception, asyncio.CancelledError):  # no answer, no leader, a refusal: the task's way decides
            seq = None
        if seq is not None:
            self.log.appends += 1
            entry = self.sync.appended(p, [seq])
            self._start_apply(c.unit, entry)
            done(c, ("ok", entry.record.version), body)
        elif fenced:
            asyncio.get_running_loop().create_task(self._after_fence(c, body, done))
        else:
            asyncio.get_running_loop().create_task(self._commit(c, p, body, done))

    async def _after_fence(self, c: Call, body: bytes, done: Done) -> None:
        done(c, await self._lost_race(c), body)

    def _start_apply(self, u: bytes, entry: Entry) -> None:
        """This node's copy takes its own commit (the caller may hear back meanwhile: the log has it);
        the unit's next call waits for it (``release``)."""
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applying[u] = applied
        self.committer.submit(Apply(u, [entry], entry.seq, False,
                                    lambda out: self.rt.post(self._applied, u, entry, applied, out)))

    def _applied(self, u: bytes, entry: Entry, applied: "asyncio.Future[None]", out: Any) -> None:
        if out[0] != "ok":  # a full disk: the commit stands in the log; the copy catches up before its next call
            log.error("%s: version %d is in the log but not in this node's copy: %s", K.split_unit(u),
                      entry.record.version, out[1])
            self.known.discard(u)
        if self._applying.get(u) is applied:
            del self._applying[u]
        applied.set_result(None)

    def verify(self, c: Call, body: bytes, done: Done) -> None:
        """``c`` read state and changed none: answer it only if its copy was current (``done`` as for commit)."""
        if not self.checks_reads:
            done(c, ("ok", 0), body)
            return
        asyncio.get_running_loop().create_task(self._verify(c, body, done))

    async def _commit(self, c: Call, p: Pending, body: bytes, done: Done) -> None:
        u = c.unit
        outcome: Any
        try:
            entry = await self.sync.append_prepared(p, c.meta.deadline or 0.0)
            if isinstance(self.log, LocalLog):  # no log: this copy is the only one, so it must hold first
                try:
                    await self.sync.apply(u, entry)
                except NotApplied as e:
                    self.log.rewind(u)
                    raise StateFull(f"this node's state store cannot take the commit: {e}") from None
            else:
                self._start_apply(u, entry)
            outcome = ("ok", entry.record.version)
        except Fenced:
            outcome = await self._lost_race(c)
        except Unreachable as e:
            self.known.discard(u)  # whatever happened, the copy must be checked against the log next time
            self.counts["unknown"] += 1
            outcome = ("error", Unavailable(f"{e}; call again with the same future id (key={c.id!r}) to learn "
                                            "whether it committed"))
        except StateError as e:
            self.known.discard(u)
            outcome = ("error", e)
        except Exception as e:  # never leave the call hanging
            log.exception("future %s: commit of %s failed", c.id, K.split_unit(u))
            self.known.discard(u)
            outcome = ("error", StateError(f"the commit failed: {public_text(e)}"))
        done(c, outcome, body)

    async def _verify(self, c: Call, body: bytes, done: Done) -> None:
        assert c.txn is not None
        try:
            last = await self.log.last(c.unit)
        except Exception as e:
            done(c, ("error", self._failed(c, "cannot check session state against its log", e, Unavailable)), body)
            return
        if (last.seq if last is not None else 0) == c.txn.base["s"]:
            done(c, ("ok", c.txn.base["v"]), body)
            return
        self.counts["stale_reads"] += 1
        done(c, await self._lost_race(c), body)

    def refresh(self, c: Call, then: Callable[[Call], None]) -> None:
        """Catch ``c``'s copy up, then ``then(c)``: a call that lost a race paused, and the winner went
        on committing; on the copy of the lost race it would lose again (a hot session's, every time)."""
        asyncio.get_running_loop().create_task(self._refresh(c, then))

    async def _refresh(self, c: Call, then: Callable[[Call], None]) -> None:
        err = await self._caught_up(c)
        if err is not None and not c.done:
            self.answer.fail(c, type(err), err.message)
        # still its turn, neither queued nor running (a migration may have withdrawn and re-admitted it)
        elif not c.done and self.owner.get(c.unit) is c and c.inst is None and c.entry is None:
            then(c)

    async def _caught_up(self, c: Call) -> StateError | Unavailable | None:
        """Catch ``c``'s unit up; the error its caller gets if that fails."""
        try:
            await self.sync.catch_up(c.unit)
        except Exception as e:
            self.known.discard(c.unit)
            kind = Unavailable if isinstance(e, Unreachable) else StateError
            return self._failed(c, f"cannot catch up session state {K.split_unit(c.unit)}", e, kind)
        return None

    async def _lost_race(self, c: Call) -> Any:
        """Another node committed first: catch up, then the call runs again (or its commit stands)."""
        self.counts["conflicts"] += 1
        err = await self._caught_up(c)
        if err is not None:
            return ("error", err)
        prior = self.store.find_future(c.id)
        if prior is not None:  # this very future committed elsewhere (a retry): its answer stands
            self.counts["answered_from_log"] += 1
            return ("duplicate", prior[0]["v"], prior[1])
        return ("conflict", Conflict("another node committed this session's state first"))

    def _failed(self, c: Call, what: str, e: Exception,
                kind: type[StateError] | type[Unavailable] = StateError) -> StateError | Unavailable:
        """The error ``c``'s caller gets: what happened, without the host details an OS, LMDB or NATS
        error carries; those go to this node's log at WARNING, with the future id."""
        log.warning("future %s (%s): %s: %r", c.id, K.split_unit(c.unit), what, e)
        return kind(f"{what}: {public_text(e)}")

    # -- inspection -------------------------------------------------------------------------------------
    async def actors_of(self, session: str) -> list[str]:
        """Actors with state for ``session``: in the log, or (without one) in this node's copy."""
        found = set(self.store.units_of(session))
        found.update(await self.log.actors_of(session))
        return sorted(found)

    def status(self) -> dict[str, Any]:
        s = self.store
        return {"path": s.path, "map_size": s.map_size(), "units": len(self.known),
                "commit_batches": self.committer.batches, "commit_ops": self.committer.ops,
                **self.log.describe(), **self.sync.counts, **self.counts}
