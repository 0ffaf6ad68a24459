"""Group commit: one writer thread applies every waiting operation in one LMDB transaction.

Callers hand over operations (log entries to apply: a node's own commit once the log has it, or a
catch-up; a unit's removal) and get the outcome through a callback. Whatever queued up while the previous batch was syncing goes into the next
one, so under load many commits share one fsync and durability costs little throughput. Each
operation runs in a nested transaction: one that fails (a conflict, garbage in the store) is rolled
back alone and the rest of the batch still commits.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, NamedTuple

import lmdb
import orjson

from ..bus.errors import StateError, StateFull
from . import keys as K
from .record import SET, SNAPSHOT, Record, extend
from .store import Store, decode_head, empty_head

log = logging.getLogger("nalar.state")
MAX_BATCH = 1024
#: Versions a commit may compact, at most (each commit adds one: the window drains as fast as it fills).
COMPACT_STEP = 4
#: The dedup window keeps at most this many times ``history`` versions, whatever their times say.
MAX_WINDOW_FACTOR = 64


class Op:
    """One write; ``apply`` runs on the committer thread inside a (nested) write transaction."""

    done: Callable[[Any], None]

    def apply(self, store: Store, txn: Any) -> Any:
        raise NotImplementedError


class Entry(NamedTuple):
    """A complete record read from (or just appended to) the unit's log."""

    seq: int  # its last message's sequence
    first: int  # its first message's sequence (a snapshot's is where catching up starts)
    parts: int
    record: Record


class Apply(Op):
    """Bring this node's copy of a unit forward by log entries, in order; ``upto`` is the last sequence seen.

    An entry at or below the copy's sequence is already here (a catch-up and the node's own commit may
    both carry it) and is skipped. ``reset`` starts the copy over (catching up from a snapshot after a
    gap). The outcome is ``("ok", version, sequence)``.
    """

    __slots__ = ("unit", "entries", "upto", "reset", "done", "pending")

    def __init__(self, unit: bytes, entries: list[Entry], upto: int, reset: bool,
                 done: Callable[[Any], None], pending: tuple[int, int] | None = None) -> None:
        self.unit = unit
        self.entries = entries
        self.upto = upto
        self.reset = reset
        self.done = done
        self.pending = pending  # a record seen only in part at the end: where to read again from

    def apply(self, store: Store, txn: Any) -> Any:
        u = self.unit
        h = None if self.reset else decode_head(txn.get(K.head(u)), u)
        if h is None:
            if self.reset:
                _drop(txn, u)
            h = empty_head()
        objs = h["o"]
        for e in self.entries:
            if e.seq <= h["s"]:
                continue
            r = e.record
            if r.kind == SNAPSHOT:
                for name in list(objs):
                    txn.delete(K.obj(u, name))
                objs.clear()
                h["z"] = 0
                h["b"], h["c"], h["d"] = e.first, 0, 0
                for fid, ver, reply in r.futures:  # recognised here as if this copy had made them
                    if ver <= r.version - store.history:
                        continue
                    fk = K.future(fid)
                    if txn.get(fk) is None:
                        txn.put(fk, orjson.dumps({"u": K.split_unit(u), "v": ver}) + b"\n" + reply)
                    lk = K.log(u, ver)
                    if txn.get(lk) is None:  # so it is compacted, dropped and carried on like the rest
                        txn.put(lk, orjson.dumps({"f": fid, "m": "", "w": [], "k": "carried", "t": r.at}))
            elif r.version != h["v"] + 1:
                raise StateError(f"the log of {K.split_unit(u)} jumps from version {h['v']} to {r.version}")
            else:
                h["c"] += e.parts
                h["d"] += sum(len(c.data) for c in r.writes)
            for c in r.writes:
                K.check_object_name(c.name)
                key = K.obj(u, c.name)
                old = txn.get(key)
                data = c.data if c.op == SET else extend(old if old is not None else b"[]", c.data)
                txn.put(key, data)
                h["z"] += len(data) - (len(old) if old is not None else 0)
                objs[c.name] = r.version
            h["v"] = r.version
            h["s"] = e.seq
            txn.put(K.log(u, r.version), orjson.dumps({"f": r.future, "m": r.method, "t": r.at,
                                                       "w": [c.name for c in r.writes], "a": max(0, r.attempt),
                                                       "n": r.node, "s": e.seq, "k": r.kind}))
            txn.put(K.future(r.future), orjson.dumps({"u": K.split_unit(u), "v": r.version}) + b"\n" + r.reply)
            _compact(store, txn, u, r.version, r.at)
        p = h.get("p")
        if p and any(e.first <= p[0] <= e.seq for e in self.entries):
            del h["p"]  # the record it had seen the start of is here now
        if self.upto > h["s"]:  # trailing parts: of a record still being appended, or one that never will be
            h["s"] = self.upto
            if self.pending is not None and self.pending[0] > (self.entries[-1].seq if self.entries else 0):
                h["p"] = list(self.pending)
            elif h.get("p") and self.pending is None:
                del h["p"]
        txn.put(K.head(u), orjson.dumps(h))
        return ("ok", h["v"], h["s"])


def _compact(store: Store, txn: Any, u: bytes, v: int, at: float) -> None:
    """Forget the oldest versions that left the window: more than ``history`` versions behind ``v``
    and committed more than ``dedup_window`` seconds before ``at`` (the record's own time, so every
    copy compacts alike). At most ``COMPACT_STEP`` per commit: the window drains as it fills."""
    upto = v - store.history
    if upto < 1:
        return
    cutoff = at - store.dedup_window
    pre = K.log_prefix(u)
    cur = txn.cursor()
    doomed: list[tuple[bytes, Any]] = []
    if cur.set_range(pre):
        for k, raw in cur:
            if len(doomed) >= COMPACT_STEP or not k.startswith(pre) or K.version_of(k) > upto:
                break
            ver = K.version_of(k)
            try:
                e = orjson.loads(raw)
            except orjson.JSONDecodeError:
                e = None
            if not isinstance(e, dict):
                log.warning("compacting a garbled log record of %s", K.split_unit(u))
                e = {}
            t = e.get("t")
            young = isinstance(t, (int, float)) and not isinstance(t, bool) and t > cutoff
            # a retry of it may still come; beyond the cap, whatever its time says (a clock ahead)
            if young and ver > v - store.history * MAX_WINDOW_FACTOR:
                break
            doomed.append((bytes(k), e.get("f")))
    for k, fid in doomed:
        txn.delete(k)
        if isinstance(fid, str):
            txn.delete(K.future(fid))


class Drop(Op):
    """Remove this node's copy of a unit (the log still has it)."""

    def __init__(self, unit: bytes, done: Callable[[Any], None]) -> None:
        self.unit = unit
        self.done = done

    def apply(self, store: Store, txn: Any) -> Any:
        return ("ok", _drop(txn, self.unit))


def _drop(txn: Any, u: bytes) -> int:
    n = 0
    for pre in (K.obj_prefix(u), K.log_prefix(u)):
        cur = txn.cursor()
        doomed = []
        if cur.set_range(pre):
            for k, v in cur:
                if not k.startswith(pre):
                    break
                doomed.append(bytes(k))
                if k[:1] == b"l":
                    try:
                        fid = orjson.loads(v).get("f")
                    except (orjson.JSONDecodeError, AttributeError):
                        fid = None
                    if isinstance(fid, str):
                        doomed.append(K.future(fid))
        for k in doomed:
            n += bool(txn.delete(k))
    n += bool(txn.delete(K.head(u)))
    return n


def _unit_of(op: Op) -> str:
    u = getattr(op, "unit", None)
    return str(K.split_unit(u)) if isinstance(u, bytes) else type(op).__name__


class Committer:
    """The store's single writer."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._q: "queue.SimpleQueue[Op | None]" = queue.SimpleQueue()
        self.batches = 0
        self.ops = 0
        self._thread = threading.Thread(target=self._run, name="nalar-committer", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> None:
        self._q.put(op)

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    op = self._q.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stopping = True
                    break
                batch.append(op)
            self._apply(batch)

    def _apply(self, batch: list[Op]) -> None:
        store = self.store

        def run(txn: Any) -> list[Any]:
            outcomes = []
            for op in batch:
                child = store.env.begin(write=True, parent=txn)
                try:
                    out = op.apply(store, child)
                except lmdb.MapFullError:  # the map must grow: the whole batch is retried after
                    child.abort()
                    raise
                except Exception as e:  # this op alone fails (garbage, a key too long, ...); the batch goes on
                    child.abort()
                    if isinstance(e, ValueError):  # a bad object name, a garbled value: nalar's and orjson's words
                        e = StateError(f"{type(e).__name__}: {e}")
                    elif not isinstance(e, StateError):  # LMDB's and the OS's texts name files: they stay in the log
                        log.warning("a state write to %s failed: %r", _unit_of(op), e)
                        e = StateError(f"this node's state store could not take a write ({type(e).__name__}); "
                                       "nothing of it was written, and the node's log has the details")
                    outcomes.append(("error", e))
                    continue
                except BaseException:
                    child.abort()
                    raise
                if out[0] == "ok":
                    child.commit()
                else:
                    child.abort()
                outcomes.append(out)
            return outcomes

        try:
            outcomes = store.write(run)
        except StateFull as e:
            if len(batch) > 1:  # the map is at its maximum: the ops that still fit should land
                for op in batch:
                    self._apply([op])
                return
            outcomes = [("error", e)]
        except Exception as e:  # a disk error: every op of the batch fails, clearly, and nothing half-applies
            log.exception("state batch failed")
            outcomes = [("error", StateError(f"this node's state store failed ({type(e).__name__}): nothing was "
                                             "written; the node's log has the details (check its disk)"))] * len(batch)
        self.batches += 1
        self.ops += len(batch)
        for op, out in zip(batch, outcomes):
            try:
                op.done(out)
            except Exception:
                log.exception("state callback failed")
