"""Keeping this node's copy of a unit in step with the unit's log: committing to it, catching up from it.

A commit is appended to the log on the sequence the call's copy was at; only once the log has
acknowledged it (with the stream's replicas) is it applied here and may the caller hear back. If the
append is refused, another node committed first: the copy catches up and the call runs again.

Catching up reads the log after the copy's sequence. If what follows does not chain on to it (older
messages were discarded, or the copy is empty), it starts again from the latest snapshot, which every
message names; so catching up a long session reads at most one snapshot and the deltas after it.
A snapshot is written in place of a delta once the deltas since the last one outweigh the state or
number ``SNAPSHOT_EVERY``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, NamedTuple

from ..bus.errors import StateError
from . import keys as K
from .committer import Apply, Committer, Entry, Op
from .log import H_BASE, H_PART, H_PREV, Fenced, Msg, UnitLog
from .record import DELTA, SET, SNAPSHOT, Change, Record, decode, encode
from .store import Store
from .upgrade import OldUnit

log = logging.getLogger("nalar.state")
#: ``post(fn, *args)``: run ``fn(*args)`` on the loop soon, from any thread.
Post = Callable[..., Any]
#: Messages on a unit's subject between snapshots, at most (``log.MAX_PER_UNIT`` keeps far more).
SNAPSHOT_EVERY = 256
#: Deltas since the last snapshot smaller than this never call for one (whatever the state's size).
SNAPSHOT_MIN_BYTES = 256 * 1024
#: Replies a snapshot carries for recognising retried futures, at most (bytes).
SNAPSHOT_REPLY_BYTES = 1024 * 1024


class Pending(NamedTuple):
    """A commit ready to append: its record, the messages it goes in, the sequence they go on."""

    unit: bytes
    expected: int
    record: Record
    parts: list[tuple[bytes, dict[str, str]]]
    msg_id: str
    size: int


class NotApplied(Exception):
    """The log has the commit (it stands: the caller is answered) but this node's copy could not take it."""

    def __init__(self, version: int, why: Exception) -> None:
        super().__init__(f"committed version {version} could not be applied here: {why}")
        self.version = version


class UnitSync:
    """One node's copies of units, kept in step with their logs."""

    def __init__(self, node: str, log_: UnitLog, store: Store, committer: Committer, max_message: int,
                 post: Post | None = None) -> None:
        self.node = node
        self._post = post  # hands the committer's outcomes to the loop, one wake-up per burst
        self.log = log_
        self.store = store
        self.committer = committer
        self.max_message = max(1024, max_message)
        self._catching: dict[bytes, "asyncio.Future[int]"] = {}
        self.counts = {"caught_up": 0, "read_messages": 0, "read_bytes": 0, "skipped": 0, "snapshots": 0,
                       "appended_bytes": 0}

    # -- catching up ------------------------------------------------------------------------------
    async def catch_up(self, u: bytes) -> int:
        """Bring the copy of ``u`` up to the log's last record; the bytes read (0: it was current)."""
        running = self._catching.get(u)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._catching[u] = fut
        try:
            n = await self._catch_up(u)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: a waiter may or may not be there
            raise
        else:
            fut.set_result(n)
            return n
        finally:
            self._catching.pop(u, None)

    async def _catch_up(self, u: bytes) -> int:
        h = self.store.head(u)
        have = h["s"] if h else 0
        last = await self.log.last(u)
        if last is None:
            if have and _is_replicated(self.log):
                raise StateError(f"the state log has nothing for {K.split_unit(u)} but this node's copy is at "
                                 f"version {h['v'] if h else 0}: the state stream was deleted or lost")
            return 0
        if last.seq == have and not (h and h.get("p")):
            return 0
        if last.seq < have:
            raise StateError(f"this node's copy of {K.split_unit(u)} is ahead of its log ({have} > {last.seq}): "
                             "the state stream lost messages")
        # where the copy's chain goes on: after its last message, or at a record it saw only the start of
        start, prev = (int(h["p"][0]), int(h["p"][1])) if h and h.get("p") else (have + 1, have)
        read: list[Msg] = []
        got = None
        # a snapshot after that point is the shorter way (a message not appended by a fenced writer
        # names no base worth trusting; a base is used only if a snapshot is really there)
        base = _int(last.headers.get(H_BASE)) if _prev(last) >= 0 else 0
        if base > start:
            msgs = await self.log.read(u, base, last.seq)
            read += msgs
            got = _from_snapshot(assemble_all(msgs, None), base)
        if got is None:
            msgs = await self.log.read(u, start, last.seq)
            read += msgs
            if _chains(msgs, prev):
                got = (assemble_all(msgs, prev), False)
            else:  # a gap: what the copy lacks was discarded; start over from the latest snapshot kept
                if start > 1:
                    msgs = await self.log.read(u, 1, last.seq)
                    read += msgs
                a = assemble_all(msgs, None)
                got = _from_snapshot(a, None)
                if got is None:
                    raise StateError(f"the log of {K.split_unit(u)} no longer holds what this node's copy "
                                     f"lacks (after version {h['v'] if h else 0}), and no snapshot to start from")
        a, reset = got
        pending = a.pending
        await self.write(Apply(u, a.entries, last.seq, reset, _ignore, pending))
        size = sum(len(m.data) for m in read)
        c = self.counts
        c["caught_up"] += 1
        c["read_messages"] += len(read)
        c["read_bytes"] += size
        c["skipped"] += a.skipped
        return size

    # -- committing -----------------------------------------------------------------------------------
    async def commit(self, u: bytes, base: dict[str, Any], future: str, method: str, attempt: int,
                     changes: list[tuple[Change, bytes]], reply: bytes, deadline: float) -> int:
        """Append the call's changes to the log on ``base``'s sequence, then apply them here: the version.

        Raises ``log.Fenced`` (another commit came first), ``log.Unreachable`` (outcome unknown),
        ``NotApplied`` (committed, but not applied here) or ``StateError`` (nothing committed).
        """
        entry = await self.append(u, base, future, method, attempt, changes, reply, deadline)
        await self.apply(u, entry)
        return entry.record.version

    async def append(self, u: bytes, base: dict[str, Any], future: str, method: str, attempt: int,
                     changes: list[tuple[Change, bytes]], reply: bytes, deadline: float) -> Entry:
        """The log half of ``commit``: once it returns, the commit stands (``apply`` brings it here)."""
        return await self.append_prepared(self.prepare(u, base, future, method, attempt, changes, reply), deadline)

    def prepare(self, u: bytes, base: dict[str, Any], future: str, method: str, attempt: int,
                changes: list[tuple[Change, bytes]], reply: bytes) -> Pending:
        """The record for the call's changes (a snapshot when one is due) and the messages it goes in."""
        version = base["v"] + 1
        writes = [c for c, _ in changes]
        futures: list[tuple[str, int, bytes]] = []
        kind = DELTA
        delta = sum(len(c.data) for c in writes)
        if base["v"] and (base["c"] >= SNAPSHOT_EVERY or base["d"] + delta >= max(SNAPSHOT_MIN_BYTES, base["z"])):
            kind = SNAPSHOT
            objs = self.store.objects(u)
            objs.update((c.name, full) for c, full in changes)
            writes = [Change(name, SET, data) for name, data in sorted(objs.items())]
            futures = _bounded(self.store.recent_futures(u, self.store.history - 1))
        rec = Record(version, future, method, attempt, self.node, kind, writes, reply, futures, round(time.time(), 6))
        data = encode(rec)
        return Pending(u, base["s"], rec, self._parts(data, base["b"]), f"{future}:{version}", len(data))

    def _parts(self, data: bytes, snapshot: int) -> list[tuple[bytes, dict[str, str]]]:
        """A record's messages: one, or consecutive parts of at most ``max_message`` bytes."""
        size = self.max_message
        chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        n = len(chunks)
        b = str(snapshot)
        return [(chunk, {H_BASE: b, H_PART: f"{i}/{n}"} if n > 1 else {H_BASE: b}) for i, chunk in enumerate(chunks)]

    def appended(self, p: Pending, seqs: list[int]) -> Entry:
        """``p`` is in the log at ``seqs``: its entry (count it)."""
        self.counts["appended_bytes"] += p.size
        if p.record.kind == SNAPSHOT:
            self.counts["snapshots"] += 1
        return Entry(seqs[-1], seqs[0], len(seqs), p.record)

    async def append_prepared(self, p: Pending, deadline: float) -> Entry:
        seqs = await self.log.append(p.unit, p.expected, p.parts, p.msg_id, deadline)
        return self.appended(p, seqs)

    async def apply(self, u: bytes, entry: Entry) -> None:
        """Apply this node's own committed entry to its copy (``NotApplied`` if the copy cannot take it)."""
        try:
            await self.write(Apply(u, [entry], entry.seq, False, _ignore))
        except Exception as e:  # a full disk: the commit stands in the log; the copy catches up later
            log.error("%s: version %d is in the log but not in this node's copy: %s", K.split_unit(u),
                      entry.record.version, e)
            raise NotApplied(entry.record.version, e) from None

    async def seed(self, old: OldUnit) -> bool:
        """Put a unit from a store written before the log into the log, as a snapshot, and apply it
        here; False (nothing written) if the log already has the unit: then it is newer."""
        u = old.unit
        if await self.log.last(u) is not None:
            return False
        fid = f"nalar-upgrade:{self.node}:{u.hex()[:96]}"
        writes = [Change(name, SET, data) for name, data in sorted(old.objects.items())]
        futures = _bounded(old.futures[-(self.store.history - 1):])
        rec = Record(max(1, old.version), fid, "(upgrade)", 0, self.node, SNAPSHOT, writes, b"null", futures,
                     round(time.time(), 6))
        try:
            seqs = await self.log.append(u, 0, self._parts(encode(rec), 0), fid, time.time() + 60)
        except Fenced:  # another node put it there first
            return False
        await self.write(Apply(u, [Entry(seqs[-1], seqs[0], len(seqs), rec)], seqs[-1], False, _ignore))
        return True

    async def write(self, op: Op) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        post: Post = self._post or loop.call_soon_threadsafe
        op.done = lambda out: post(_settle, fut, out)
        self.committer.submit(op)
        out = await fut
        if out[0] != "ok":
            raise out[1]
        return out[1:]


class Assembled(NamedTuple):
    entries: list[Entry]
    skipped: int
    pending: tuple[int, int] | None  # a trailing record seen only in part: (its first sequence, the one before)


def assemble(msgs: list[Msg], prev: int | None) -> tuple[list[Entry], int]:
    """The complete records in ``msgs`` (parts joined), and how many messages were skipped."""
    a = assemble_all(msgs, prev)
    return a.entries, a.skipped


def assemble_all(msgs: list[Msg], prev: int | None) -> Assembled:
    """The complete records in ``msgs``, the messages skipped, and a trailing record not complete yet.

    A message that does not name the one before it as its base was not appended by a fenced writer,
    and one part without the rest, followed by something else, is a commit that never finished: both
    are skipped, and carry no state. The parts at the end may be a commit still being appended: the
    next catch-up reads them again from its first part.
    """
    entries: list[Entry] = []
    skipped = 0
    pending: list[Msg] = []
    for m in msgs:
        p = _prev(m)
        if prev is not None and p != prev:
            skipped += 1 + len(pending)
            pending = []
            prev = m.seq
            continue
        prev = m.seq
        i, n = _part(m)
        if i == 0:
            skipped += len(pending)  # a record that never got its last part
            pending = [m]
        elif pending and len(pending) == i:
            pending.append(m)
        else:
            skipped += 1 + len(pending)
            pending = []
            continue
        if i == n - 1:
            try:
                rec = decode(b"".join(x.data for x in pending))
            except StateError as e:
                log.warning("skipping a record in the state log: %s", e)
                skipped += len(pending)
            else:
                entries.append(Entry(m.seq, pending[0].seq, n, rec))
            pending = []
    return Assembled(entries, skipped, (pending[0].seq, _prev(pending[0])) if pending else None)


def _chains(msgs: list[Msg], prev: int) -> bool:
    """Do ``msgs`` go on from ``prev``? Messages no fenced writer appended (no ``Nalar-Prev``) are
    passed over; the first that names a base must name ``prev`` or one of those."""
    seen = {prev}
    for m in msgs:
        p = _prev(m)
        if p < 0:
            seen.add(m.seq)
            continue
        return p in seen
    return True  # nothing but garbage after the copy: nothing to apply, no gap


def _from_snapshot(a: Assembled, at: int | None) -> tuple[Assembled, bool] | None:
    """``a`` from its latest snapshot on (one that starts at ``at``, if given), to apply over an empty
    copy; or from its first record if that is version 1. None if neither is there."""
    for k in range(len(a.entries) - 1, -1, -1):
        e = a.entries[k]
        if e.record.kind == SNAPSHOT and (at is None or e.first == at):
            return Assembled(a.entries[k:], a.skipped, a.pending), True
        if at is not None and e.first < at:
            break
    if at is None and a.entries and a.entries[0].record.version == 1:
        return a, True
    if at is None and not a.entries and a.pending is not None:  # only the start of a first record
        return a, False
    return None


def _prev(m: Msg) -> int:
    return _int(m.headers.get(H_PREV), -1)


def _part(m: Msg) -> tuple[int, int]:
    raw = m.headers.get(H_PART)
    if raw is None:
        return 0, 1
    i, _, n = raw.partition("/")
    try:
        a, b = int(i), int(n)
    except ValueError:
        return -1, 0
    return (a, b) if 0 <= a < b else (-1, 0)


def _int(raw: str | None, default: int = 0) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def _bounded(futures: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
    """The newest futures whose replies fit ``SNAPSHOT_REPLY_BYTES``."""
    out: list[tuple[str, int, bytes]] = []
    total = 0
    for f in reversed(futures):
        total += len(f[2]) + len(f[0])
        if total > SNAPSHOT_REPLY_BYTES:
            break
        out.append(f)
    out.reverse()
    return out


def _is_replicated(log_: UnitLog) -> bool:
    return log_.describe().get("log") == "jetstream"


def _settle(fut: "asyncio.Future[Any]", out: Any) -> None:
    if not fut.done():
        fut.set_result(out)


def _ignore(_: Any) -> None:
    pass
