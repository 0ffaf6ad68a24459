"""Group commit: one writer thread applies every waiting operation in one durable LMDB transaction.

Callers hand over operations (a call's commit, a migration's import, a unit's removal) and get the
outcome through a callback. Whatever queued up while the previous batch was syncing goes into the next
one, so under load many commits share one fsync and durability costs little throughput. Each
operation runs in a nested transaction: one that fails (a conflict, garbage in the store) is rolled
back alone and the rest of the batch still commits.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import lmdb
import orjson

from ..bus.errors import Conflict, StateError, StateFull
from . import keys as K
from .store import Store, decode_future, decode_head

log = logging.getLogger("nalar.state")
MAX_BATCH = 1024


class Op:
    """One write; ``apply`` runs on the committer thread inside a (nested) write transaction."""

    done: Callable[[Any], None]

    def apply(self, store: Store, txn: Any) -> Any:
        raise NotImplementedError


class Commit(Op):
    """A call's effect on one unit: the objects it wrote, checked against the versions it saw.

    ``seen`` maps every object the call read or wrote to the version it found (0: none). The commit
    applies only if all of them are still at those versions (optimistic concurrency per object), and
    only if ``future_id`` has not committed before (exactly-once effect under retries).
    """

    __slots__ = ("unit", "future_id", "method", "attempt", "seen", "writes", "reply", "done")

    def __init__(self, unit: bytes, future_id: str, method: str, attempt: int, seen: dict[str, int],
                 writes: dict[str, bytes], reply: bytes, done: Callable[[Any], None]) -> None:
        self.unit = unit
        self.future_id = future_id
        self.method = method
        self.attempt = attempt
        self.seen = seen
        self.writes = writes
        self.reply = reply
        self.done = done

    def apply(self, store: Store, txn: Any) -> Any:
        u = self.unit
        fkey = K.future(self.future_id)
        prior = txn.get(fkey)
        if prior is not None:  # this future already committed (a retry): its effect is not applied again
            return ("duplicate", *decode_future(prior))
        h = decode_head(txn.get(K.head(u)), u) or {"v": 0, "o": {}}
        objs = h["o"]
        for name, ver in self.seen.items():
            if objs.get(name, 0) != ver:
                return ("conflict", Conflict(f"object {name!r} changed to version {objs.get(name, 0)} "
                                             f"after this call read version {ver}"))
        v = h["v"] + 1
        superseded = []
        for name, data in self.writes.items():
            prev = objs.get(name)
            txn.put(K.obj(u, name, v), data)
            if prev:
                superseded.append([name, prev])
            objs[name] = v
        h["v"] = v
        txn.put(K.head(u), orjson.dumps(h))
        txn.put(K.log(u, v), orjson.dumps({"f": self.future_id, "m": self.method, "t": round(time.time(), 6),
                                           "w": sorted(self.writes), "s": superseded, "a": max(0, self.attempt)}))
        txn.put(fkey, orjson.dumps({"u": K.split_unit(u), "v": v}) + b"\n" + self.reply)
        _compact(store, txn, u, v)
        return ("ok", v)


def _compact(store: Store, txn: Any, u: bytes, v: int) -> None:
    """Forget the version that just left the history window: its log, its future, what it superseded."""
    old = v - store.history
    if old < 1:
        return
    lkey = K.log(u, old)
    entry = txn.get(lkey)
    if entry is None:
        return
    try:
        e = orjson.loads(entry)
        for name, prev in e.get("s", []):
            txn.delete(K.obj(u, name, int(prev)))
        if isinstance(e.get("f"), str):
            txn.delete(K.future(e["f"]))
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        log.warning("skipping compaction of a garbled log record of %s", K.split_unit(u))
    txn.delete(lkey)


class Put(Op):
    """Write records as they are (a migrated unit arriving), replacing what the unit had here."""

    def __init__(self, unit: bytes, records: list[tuple[bytes, bytes]], done: Callable[[Any], None]) -> None:
        self.unit = unit
        self.records = records
        self.done = done

    def apply(self, store: Store, txn: Any) -> Any:
        _drop(txn, self.unit)
        for k, v in self.records:
            txn.put(k, v)
        return ("ok", len(self.records))


class Drop(Op):
    """Remove a unit (after it moved away)."""

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
                    err = e if isinstance(e, StateError) else StateError(f"{type(e).__name__}: {e}")
                    outcomes.append(("error", err))
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
            outcomes = [("error", StateError(f"the state store failed: {e!r}"))] * len(batch)
        self.batches += 1
        self.ops += len(batch)
        for op, out in zip(batch, outcomes):
            try:
                op.done(out)
            except Exception:
                log.exception("state callback failed")
