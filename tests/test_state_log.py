"""The per-unit state log on a real JetStream, with the state modules used directly (no node process).

Each ``Peer`` is one "node": its own NATS connection, its own handle on the log, its own LMDB store,
committer and ``UnitSync``. A commit is made as a node makes it: a ``Txn`` on the copy, managed objects
changed inside it, ``UnitSync.commit`` on the transaction's base.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import orjson
import pytest

import nalar
from nalar.bus import envelope as env
from nalar.bus.connection import ConnectOptions, open_connection
from nalar.bus.transport import NatsTransport
from nalar.state import keys as K
from nalar.state import log as L
from nalar.state import record as R
from nalar.state import sync as S
from nalar.state.committer import Committer
from nalar.state.log import H_BASE, H_PART, H_PREV, Fenced, JetStreamLog
from nalar.state.managed import Txn, current_txn, managed_dict, managed_list, managed_value
from nalar.state.record import Change, Record
from nalar.state.store import Store
from nalar.state.sync import UnitSync, assemble

pytestmark = pytest.mark.timeout(120)


class Peer:
    """One node's side of the state: a connection, the log, a store, its committer and a UnitSync."""

    def __init__(self, name: str, t: NatsTransport, log: JetStreamLog, store: Store, sync: UnitSync) -> None:
        self.name = name
        self.t = t
        self.log = log
        self.store = store
        self.sync = sync

    @property
    def js(self) -> Any:
        return self.t.jetstream()

    def txn(self, u: bytes, fn: Callable[[], Any]) -> Txn:
        """A call's transaction on this copy, with ``fn`` run inside it (it uses managed objects)."""
        txn = Txn(self.store, u)
        token = current_txn.set(txn)
        try:
            fn()
        finally:
            current_txn.reset(token)
        return txn

    async def commit(self, u: bytes, txn: Txn, fid: str, reply: bytes = b"null") -> int:
        return await self.sync.commit(u, txn.base, fid, "m", 0, txn.changes(), reply, time.time() + 30)

    async def call(self, u: bytes, fn: Callable[[], Any], fid: str | None = None, reply: bytes = b"null") -> int:
        """Run and commit like a node: if the log refuses (another commit came first), catch up and run again."""
        fid = fid or uuid.uuid4().hex
        for _ in range(20):
            try:
                return await self.commit(u, self.txn(u, fn), fid, reply)
            except Fenced:
                await self.sync.catch_up(u)
        raise AssertionError("fenced 20 times in a row")

    def state(self, u: bytes) -> tuple[int, int, dict[str, Any]]:
        h = self.store.head(u) or {"v": 0, "s": 0}
        return h["v"], h["s"], {n: orjson.loads(d) for n, d in self.store.objects(u).items()}

    async def records(self, u: bytes) -> tuple[list[Any], int]:
        """Every complete record the log has for ``u`` (and how many messages were skipped)."""
        last = await self.log.last(u)
        msgs = await self.log.read(u, 1, last.seq) if last else []
        return assemble(msgs, None)


@pytest.fixture
async def peers(nats_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Peer] = []

    async def open_peer(name: str, max_message: int | None = None, history: int = 1000,
                        dedup_window: float = 120.0) -> Peer:
        t = NatsTransport(await open_connection(ConnectOptions.resolve(nats_url, name=name)))
        try:
            log = await JetStreamLog.open(t.jetstream(), t.nc, namespace)
            store = Store(str(tmp_path / name), sync=False, history=history, dedup_window=dedup_window)
        except BaseException:
            await t.close()
            raise
        committer = Committer(store)
        mm = max_message if max_message is not None else t.max_payload - env.HEADER_ALLOWANCE
        p = Peer(name, t, log, store, UnitSync(name, log, store, committer, mm))
        opened.append(p)
        return p

    yield open_peer
    for p in opened:
        p.sync.committer.stop()
        p.store.close()
        await p.t.close()


def _set(name: str, value: Any) -> Callable[[], None]:
    def fn() -> None:
        managed_value(name).value = value
    return fn


def _append(name: str, *items: Any) -> Callable[[], None]:
    def fn() -> None:
        managed_list(name).extend(items)
    return fn


# -- a. fencing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_message", [None, 1024], ids=["one-message", "multi-part"])
async def test_two_nodes_committing_on_one_base_exactly_one_lands(peers, max_message):
    a, b = await peers("a", max_message), await peers("b", max_message)
    u = K.unit("race", "A")
    pad = "p" * (3000 if max_message else 10)  # multi-part: every record is several messages
    assert await a.call(u, _set("n", "start")) == 1
    await b.sync.catch_up(u)
    for rnd in range(10):
        assert a.state(u) == b.state(u)
        v = a.state(u)[0]
        ta, tb = a.txn(u, _set("n", f"a{rnd}{pad}")), b.txn(u, _set("n", f"b{rnd}{pad}"))
        assert ta.base["s"] == tb.base["s"]  # the same base
        out = await asyncio.gather(a.commit(u, ta, f"fa{rnd}"), b.commit(u, tb, f"fb{rnd}"),
                                   return_exceptions=True)
        won = [o for o in out if o == v + 1]
        lost = [o for o in out if isinstance(o, Fenced)]
        assert len(won) == 1 and len(lost) == 1, out
        winner, loser = (a, b) if out[0] == v + 1 else (b, a)
        last = await a.log.last(u)
        assert lost[0].last > ta.base["s"]
        entries, skipped = await a.records(u)
        assert skipped == 0
        assert [e.record.version for e in entries] == list(range(1, v + 2))  # exactly one version v+1
        assert entries[-1].seq == last.seq and entries[-1].record.future == f"f{winner.name}{rnd}"
        await loser.sync.catch_up(u)
        assert loser.state(u) == winner.state(u)
        assert loser.store.find_future(f"f{loser.name}{rnd}") is None
        assert loser.store.find_future(f"f{winner.name}{rnd}")[0]["v"] == v + 1
    assert a.log.fenced + b.log.fenced == 10


async def test_a_commit_on_a_stale_copy_is_fenced_until_it_catches_up(peers):
    a, b = await peers("a"), await peers("b")
    u = K.unit("stale", "A")
    await a.call(u, _append("l", 1))
    await b.sync.catch_up(u)
    await a.call(u, _append("l", 2))
    stale = b.txn(u, _append("l", 3))
    with pytest.raises(Fenced):
        await b.commit(u, stale, "fb")
    assert b.state(u)[0] == 1  # the refused commit left nothing here
    assert await b.call(u, _append("l", 3), fid="fb") == 3  # caught up, run again on version 2
    await a.sync.catch_up(u)
    assert a.state(u) == b.state(u) and a.state(u)[2] == {"l": [1, 2, 3]}


# -- b. catching up an empty copy ------------------------------------------------------------------------
@pytest.mark.parametrize("snapshot_every", [256, 7])
async def test_an_empty_node_catches_up_objects_versions_and_futures(peers, monkeypatch, snapshot_every):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", snapshot_every)
    w = await peers("writer")
    u = K.unit("sess-b", "Agent")
    fids = []
    for i in range(40):
        def change(i: int = i) -> None:
            managed_value("n", 0).value += 1
            managed_list("notes").append({"i": i, "text": f"note, [{i}]"})
            if i % 5 == 0:
                managed_dict("d")[f"k{i}"] = [i, str(i)]
            if i % 9 == 0:
                managed_list("short").append(i)
                if i % 18 == 0:
                    managed_list("short").pop(0)  # not an append: recorded in full
        fids.append(f"fut-{i}")
        assert await w.call(u, change, fid=fids[-1], reply=orjson.dumps({"reply": i})) == i + 1
    assert (w.sync.counts["snapshots"] > 0) == (snapshot_every < 40)
    r = await peers("reader")
    assert r.state(u) == (0, 0, {})
    assert await r.sync.catch_up(u) > 0
    assert r.state(u) == w.state(u)
    assert r.state(u)[0] == 40 and r.state(u)[2]["n"] == 40 and len(r.state(u)[2]["notes"]) == 40
    for fid in fids:  # every committed future is recognised: a retry of any of them is answered, not re-run
        assert r.store.find_future(fid) == w.store.find_future(fid) is not None
    assert r.sync.counts["skipped"] == 0
    assert await r.sync.catch_up(u) == 0  # current: nothing more to read
    # and the reader's copy is good to commit on
    assert await r.call(u, _set("n", -1)) == 41
    await w.sync.catch_up(u)
    assert w.state(u) == r.state(u)


async def test_an_empty_copy_reads_only_the_latest_snapshot_and_what_follows(peers, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", 7)
    w = await peers("writer")
    u = K.unit("bounded", "A")
    for i in range(40):
        await w.call(u, _append("l", i))
    last = await w.log.last(u)
    base = int(last.headers[H_BASE])
    assert base > 20
    r = await peers("reader")
    await r.sync.catch_up(u)
    assert r.state(u) == w.state(u)
    assert r.sync.counts["read_messages"] == last.seq - base + 1


# -- c. a gap: older messages discarded ---------------------------------------------------------------------
async def _purge_before(p: Peer, u: bytes, first_kept: int) -> None:
    last = await p.log.last(u)
    assert last is not None
    await p.js.purge_stream(p.log.stream, subject=p.log.subject(u), keep=last.seq - first_kept + 1)
    msgs = await p.log.read(u, 1, last.seq)
    assert msgs[0].seq == first_kept  # the purge really left a gap


async def test_after_a_gap_a_node_catches_up_from_the_snapshot_and_knows_recent_futures(peers, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", 8)
    w = await peers("writer")
    stale = await peers("stale")
    u = K.unit("gap", "A")
    for i in range(10):
        await w.call(u, _append("l", i), fid=f"g{i}", reply=str(i).encode())
    await stale.sync.catch_up(u)
    assert stale.state(u)[0] == 10
    for i in range(10, 40):
        await w.call(u, _append("l", i), fid=f"g{i}", reply=str(i).encode())
    assert w.sync.counts["snapshots"] >= 3
    last = await w.log.last(u)
    base = int(last.headers[H_BASE])
    assert 10 < base < last.seq
    await _purge_before(w, u, base)  # only the latest snapshot and the deltas after it are left
    fresh = await peers("fresh")
    await fresh.sync.catch_up(u)
    assert fresh.state(u) == w.state(u) and fresh.state(u)[2]["l"] == list(range(40))
    assert fresh.sync.counts["read_messages"] == last.seq - base + 1
    # a retried future whose own message is gone is still recognised (the snapshot carries it)
    entries, _ = await w.records(u)
    gone = [f"g{i}" for i in range(40) if f"g{i}" not in {e.record.future for e in entries}]
    assert gone and "g5" in gone
    got = fresh.store.find_future("g5")
    assert got is not None and got[0]["v"] == 6 and got[1] == b"5"
    # the stale copy's sequence is in the gap: it starts over from the snapshot too
    await stale.sync.catch_up(u)
    assert stale.state(u) == w.state(u)
    assert stale.store.find_future("g30")[1] == b"30"
    # and both can go on committing
    assert await fresh.call(u, _append("l", 40)) == 41
    assert await stale.call(u, _append("l", 41)) == 42
    await w.sync.catch_up(u)
    assert w.state(u) == stale.state(u) and w.state(u)[2]["l"] == list(range(42))


async def test_a_gap_the_log_cannot_bridge_is_a_clear_error_and_changes_nothing(peers, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", 8)
    w = await peers("writer")
    u = K.unit("lost", "A")
    for i in range(12):
        await w.call(u, _append("l", i))
    last = await w.log.last(u)
    base = int(last.headers[H_BASE])
    await _purge_before(w, u, base + 2)  # the snapshot itself is gone: deltas without their base
    r = await peers("reader")
    other = K.unit("other", "A")
    await r.call(other, _set("x", 1))
    with pytest.raises(nalar.StateError):
        await r.sync.catch_up(u)
    assert r.state(u) == (0, 0, {}) and r.state(other)[0] == 1


async def _hop(p: Peer, u: bytes, fids: range) -> None:
    """Commit ``fids`` on ``p``, then purge the unit's subject back to its latest snapshot."""
    for i in fids:
        await p.call(u, _append("l", i), fid=f"h{i}", reply=str(i).encode())
    last = await p.log.last(u)
    assert last is not None
    await _purge_before(p, u, int(last.headers[H_BASE]))


async def test_recent_futures_survive_two_snapshot_hops(peers, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", 8)
    a, b = await peers("a"), await peers("b")
    u = K.unit("hops", "A")
    await _hop(a, u, range(20))
    await b.sync.catch_up(u)  # from a's snapshot
    assert b.store.find_future("h5") is not None
    await _hop(b, u, range(20, 40))  # b writes the next snapshots
    c = await peers("c")
    await c.sync.catch_up(u)  # from b's snapshot
    assert c.state(u)[0] == 40 and c.store.history > 40
    assert c.store.find_future("h5") is not None  # version 6 of 40: a retry of it must not run again


async def test_futures_a_snapshot_brings_are_compacted_to_the_window(peers, monkeypatch):
    monkeypatch.setattr(S, "SNAPSHOT_EVERY", 8)
    a = await peers("a")
    u = K.unit("leak", "A")
    await _hop(a, u, range(30))
    b = await peers("b", history=5, dedup_window=0)
    await b.sync.catch_up(u)
    for i in range(30, 40):
        await b.call(u, _append("l", i), fid=f"h{i}")
    futures = b.store.read(lambda t: sum(1 for k, _ in t.cursor() if k[:1] == b"f"))
    assert futures <= b.store.history + 1


# -- d. deltas ------------------------------------------------------------------------------------------------
async def test_the_1000th_append_to_a_list_records_only_the_new_item(peers):
    w = await peers("writer")
    u = K.unit("deltas", "A")
    item = "x" * 100
    sizes = []
    for i in range(1000):
        before = w.sync.counts["appended_bytes"]
        await w.call(u, _append("history", f"{i:04d}{item}"), fid=f"d{i}")
        sizes.append(w.sync.counts["appended_bytes"] - before)
    full = [f"{i:04d}{item}" for i in range(1000)]
    value, ver = w.store.load(u, "history")
    assert ver == 1000 and value == orjson.dumps(full)
    assert len(value) > 100_000
    assert sizes[-1] < 1024  # one item and a header, not the list
    assert sorted(sizes)[-10] < 1024  # all but the odd snapshot are small
    last = await w.log.last(u)
    rec = R.decode(last.data)
    assert rec.kind == R.DELTA and [(c.name, c.op) for c in rec.writes] == [("history", R.EXTEND)]
    assert orjson.loads(rec.writes[0].data) == [full[-1]]
    r = await peers("reader")
    await r.sync.catch_up(u)
    assert r.store.load(u, "history") == (value, 1000)


# -- e. records in several parts --------------------------------------------------------------------------------
def _parts(record: Record, base: int, size: int) -> list[tuple[bytes, dict[str, str]]]:
    data = R.encode(record)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    n = len(chunks)
    return [(c, {H_BASE: str(base), H_PART: f"{i}/{n}"}) for i, c in enumerate(chunks)]


async def test_a_record_in_several_parts_round_trips_and_a_partial_one_is_skipped(peers):
    w = await peers("writer", max_message=4096)
    u = K.unit("parts", "A")
    big = "".join(random.Random(1).choice("abc,[]\"{}") for _ in range(20_000))
    assert await w.call(u, _set("blob", big), fid="p1") == 1
    n = -(-w.sync.counts["appended_bytes"] // 4096)
    last = await w.log.last(u)
    assert n >= 5 and last.seq == n and last.headers[H_PART] == f"{n - 1}/{n}"  # 20 KB in 4 KiB parts
    msgs = await w.log.read(u, 1, last.seq)
    assert [int(m.headers[H_PREV]) for m in msgs] == list(range(n))  # each part fenced on the one before
    assert all(len(m.data) <= 4096 for m in msgs)
    r = await peers("reader")
    await r.sync.catch_up(u)
    assert r.state(u) == w.state(u) and r.state(u)[2]["blob"] == big
    # a node killed mid-commit: the first two of its record's parts are in the log, the rest never came
    dead = Record(2, "dead", "m", 0, "dead-node", R.DELTA, [Change("blob", R.SET, orjson.dumps("dead" * 5000))],
                  b"null", [])
    parts = _parts(dead, 0, 4096)
    assert len(parts) > 2
    got = await w.log.append(u, last.seq, parts[:2], "dead:2", time.time() + 30)
    assert got == [last.seq + 1, last.seq + 2]
    # the writer's copy is behind the partial record: its commit is fenced, it catches up, it lands
    t = w.txn(u, _set("blob", "after"))
    with pytest.raises(Fenced) as fenced:
        await w.commit(u, t, "p2")
    assert fenced.value.last == last.seq + 2
    await w.sync.catch_up(u)
    assert w.state(u) == (1, last.seq + 2, {"blob": big})  # nothing of the partial record applied
    assert await w.commit(u, w.txn(u, _set("blob", "after")), "p2") == 2
    after = await w.log.read(u, last.seq + 3, last.seq + 3)
    assert int(after[0].headers[H_PREV]) == last.seq + 2  # fenced on the partial record's last part
    for peer in (r, await peers("fresh")):  # a copy that follows the log, and an empty one
        await peer.sync.catch_up(u)
        assert peer.state(u) == w.state(u) and peer.state(u)[2] == {"blob": "after"}
        assert peer.store.find_future("dead") is None and peer.store.find_future("p2") is not None
    entries, skipped = await w.records(u)
    assert [e.record.future for e in entries] == ["p1", "p2"]


async def test_parts_out_of_order_or_incomplete_are_skipped_by_assemble():
    def msg(seq: int, prev: int, part: str | None, data: bytes) -> Any:
        from nalar.state.log import Msg

        h = {H_PREV: str(prev)}
        if part is not None:
            h[H_PART] = part
        return Msg(seq, h, data)

    rec = R.encode(Record(1, "f", "m", 0, "n", R.DELTA, [Change("n", R.SET, b"1")], b"null", []))
    a, b = rec[:10], rec[10:]
    whole = [msg(1, 0, "0/2", a), msg(2, 1, "1/2", b)]
    entries, skipped = assemble(whole, 0)
    assert [(e.seq, e.first, e.parts) for e in entries] == [(2, 1, 2)] and skipped == 0
    assert assemble([msg(1, 0, "1/2", b), msg(2, 1, "0/2", a)], 0) == ([], 1)  # a lone second part; a lone first
    assert assemble([msg(1, 0, "0/2", a), msg(2, 1, "3/2", b)], 0)[0] == []  # a bad part number
    assert assemble([msg(1, 0, "0/2", a), msg(2, 7, "1/2", b)], 0)[0] == []  # not chained on the part before
    assert assemble([msg(5, 4, None, rec)], 4)[0][0].seq == 5
    assert assemble([msg(5, 3, None, rec)], 4) == ([], 1)  # not appended on the copy's sequence


# -- f. garbage on a unit's subject -------------------------------------------------------------------------------
async def test_garbage_on_the_subject_is_skipped_and_the_records_around_it_stand(peers):
    w = await peers("writer")
    u = K.unit("junk", "A")
    await w.call(u, _append("l", 1), fid="j1")
    await w.call(u, _append("l", 2), fid="j2")
    follower = await peers("follower")
    await follower.sync.catch_up(u)
    subject = w.log.subject(u)
    await w.js.publish(subject, b"\x00\xffjunk without headers")
    seq_prev = (await w.log.last(u)).seq
    await w.js.publish(subject, b"not a record", headers={H_PREV: str(seq_prev)})  # chained, but garbled
    await w.js.publish(subject, b"{}", headers={H_PREV: str(seq_prev + 1), H_PART: "5/3"})
    assert await w.call(u, _append("l", 3), fid="j3") == 3  # fenced by the junk, caught up, committed
    await w.js.publish(subject, b"[trailing junk]")  # garbage as the last message too
    for peer in (follower, await peers("fresh")):
        await peer.sync.catch_up(u)
        assert peer.state(u)[0] == 3 and peer.state(u)[2] == {"l": [1, 2, 3]}
        assert peer.sync.counts["skipped"] >= 3
        assert peer.store.find_future("j3") is not None
    assert await follower.call(u, _append("l", 4)) == 4
    await w.sync.catch_up(u)
    assert w.state(u) == follower.state(u)


# -- g. re-sending an append (a lost acknowledgement) -------------------------------------------------------
async def test_resending_an_append_returns_the_sequences_it_already_has(peers):
    p = await peers("p")
    u = K.unit("dedupe", "A")
    parts = [(b"one", {H_BASE: "0", H_PART: "0/2"}), (b"two", {H_BASE: "0", H_PART: "1/2"})]
    first = await p.log.append(u, 0, parts, "fut:1", time.time() + 30)
    again = await p.log.append(u, 0, parts, "fut:1", time.time() + 30)
    assert again == first


async def test_a_resent_append_is_never_stored_twice_and_its_commit_is_found_in_the_log(peers):
    """Whatever the log answers a re-send, the record is there once and the future is recognised from it
    (what a node does when its append is refused: catch up, look for its own future)."""
    p = await peers("p")
    q = await peers("q")
    u = K.unit("dedupe2", "A")
    t = p.txn(u, _append("l", "x"))
    assert await p.commit(u, t, "once", b'"reply"') == 1
    data = (await p.log.last(u)).data
    try:
        await p.log.append(u, 0, [(data, {H_BASE: "0"})], "once:1", time.time() + 30)
    except Fenced:
        pass
    entries, skipped = await p.records(u)
    assert [e.record.future for e in entries] == ["once"] and skipped == 0
    assert (await p.log.last(u)).seq == 1
    await q.sync.catch_up(u)
    assert q.store.find_future("once")[1] == b'"reply"'


# -- h. the record codec ---------------------------------------------------------------------------------------
def test_records_round_trip():
    rec = Record(7, "fid", "append", 2, "node-a", R.SNAPSHOT,
                 [Change("notes", R.SET, b'["a","b"]'), Change("n", R.SET, b"1"), Change("e", R.SET, b"")],
                 b'{"ok":true}', [("f5", 5, b"5"), ("f6", 6, b"")], 1764650000.5)
    assert R.decode(R.encode(rec)) == rec
    delta = rec._replace(kind=R.DELTA, futures=[], writes=[Change("notes", R.EXTEND, b'["\\n"]')], reply=b"")
    assert R.decode(R.encode(delta)) == delta


@pytest.mark.parametrize("garbage", [
    b"", b"junk", b"\n", b"{}\n", b"[]\n", b'"x"\n', b"\x00\xff\n",
    b'{"v":0,"f":"x","k":"d","w":[],"r":0}\n',  # version 0
    b'{"v":1,"f":7,"k":"d","w":[],"r":0}\n',  # future id not a string
    b'{"v":1,"f":"x","k":"z","w":[],"r":0}\n',  # an unknown kind
    b'{"v":1,"f":"x","k":"d","w":[["n","q",1]],"r":0}\n1',  # an unknown write op
    b'{"v":1,"f":"x","k":"d","w":[["n","s",-1]],"r":0}\n',  # a negative length
    b'{"v":1,"f":"x","k":"d","w":[["n","s",5]],"r":0}\n12',  # a body shorter than the header says
    b'{"v":1,"f":"x","k":"d","w":[["n","s",1]],"r":0}\n123',  # longer
    b'{"v":1,"f":"x","k":"d","w":[["n","s"]],"r":0}\n1',  # a write without its length
    b'{"v":1,"f":"x","k":"d","w":"nope","r":0}\n',
    b'{"v":1,"f":"x","k":"d","w":[],"r":"x"}\n',
    b'{"v":1,"f":"x","k":"d","w":[],"r":0,"q":[["f",1]]}\n',
    b'{"v":1,"f":"x","k":"d","w":[]}\n',  # no reply length
])
def test_a_garbled_record_is_a_state_error(garbage):
    with pytest.raises(nalar.StateError, match="garbled record"):
        R.decode(garbage)


@pytest.mark.parametrize("original,new,items", [
    ([1, 2], [1, 2, 3], [3]),
    ([1, 2], [1, 23], None),  # a number that shares a prefix is not an append
    ([1, 2], [1, 2.5], None),
    ([12], [1, 2], None),
    ([1, 2], [1], None),
    ([1], [1], None),
    ([], [1], None),  # from empty: recorded in full
    ([1], [], None),
    ([[1]], [[1], [2]], [[2]]),
    ([[1]], [[1, 2]], None),  # growing a nested list is not an append to this one
    ([[1, 2]], [[1, 23]], None),
    ([{"a": 1}], [{"a": 1, "b": 2}], None),
    ([{"a": 1}], [{"a": 1}, {"b": [2, 3]}], [{"b": [2, 3]}]),
    (["a"], ["a,b"], None),  # strings with commas and brackets
    (["a"], ["a", ",", "]", "[", "\"],["], [",", "]", "[", "\"],["]),
    (["a,b"], ["a,b", "]"], ["]"]),
    (["a\"", "b"], ["a\"", "b\"", "c"], None),
    (["x"], ["x\\", "y"], None),
    ([None, True], [None, True, False, None], [False, None]),
    (["é"], ["é", "ü"], ["ü"]),
])
def test_appended_finds_exactly_the_items_appended(original, new, items):
    o, n = orjson.dumps(original), orjson.dumps(new)
    got = R.appended(o, n)
    if items is None:
        assert got is None
    else:
        assert got is not None and orjson.loads(got) == items
        assert R.extend(o, got) == n


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(7 if depth < 3 else 4)
    if k == 0:
        return rng.choice([0, 1, 12, 123, -1, 1.5, 2**53])
    if k == 1:
        return "".join(rng.choice('ab,[]{}"\\: 1é') for _ in range(rng.randrange(4)))
    if k == 2:
        return rng.choice([None, True, False])
    if k == 3:
        return rng.choice([[], {}])
    if k in (4, 5):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_json(rng, 3)): _random_json(rng, depth + 1) for _ in range(rng.randrange(3))}


def test_appended_and_extend_agree_with_json_on_random_lists():
    rng = random.Random(12)
    found = 0
    for _ in range(3000):
        original = [_random_json(rng) for _ in range(rng.randrange(5))]
        new = list(original)
        how = rng.randrange(4)
        if how == 0:
            new.extend(_random_json(rng) for _ in range(1 + rng.randrange(3)))
        elif how == 1 and new:
            new[-1] = _random_json(rng)
        elif how == 2 and new:
            new.pop(rng.randrange(len(new)))
        else:
            new.insert(rng.randrange(len(new) + 1), _random_json(rng))
        o, n = orjson.dumps(original), orjson.dumps(new)
        got = R.appended(o, n)
        if got is not None:
            found += 1
            assert orjson.loads(o) + orjson.loads(got) == orjson.loads(n), (original, new)
            assert R.extend(o, got) == n
        elif how == 0 and original:
            raise AssertionError(f"an append of {new[len(original):]!r} to {original!r} was not recognised")
    assert found > 500


@pytest.mark.parametrize("current,items,out", [
    (b"[]", b"[]", b"[]"),
    (b"[]", b"[1]", b"[1]"),
    (b"[1]", b"[]", b"[1]"),
    (b'["a,]"]', b'[["b"]]', b'["a,]",["b"]]'),
])
def test_extend(current, items, out):
    assert R.extend(current, items) == out
    assert orjson.loads(R.extend(current, items)) == orjson.loads(current) + orjson.loads(items)


@pytest.mark.parametrize("current,items", [(b"{}", b"[1]"), (b"[1]", b"1"), (b"", b"[1]"), (b"1", b"[]")])
def test_extend_of_something_not_a_list_is_a_state_error(current, items):
    with pytest.raises(nalar.StateError, match="not a list"):
        R.extend(current, items)


def test_a_txn_records_appends_as_deltas_and_everything_else_in_full(tmp_path):
    store = Store(str(tmp_path / "s"), sync=False)
    u = K.unit("t", "A")
    try:
        def change() -> None:
            managed_list("untouched")
            managed_list("fresh").append(1)  # from empty: in full
            managed_value("v", 0).value = 2
        txn = Txn(store, u)
        token = current_txn.set(txn)
        try:
            change()
        finally:
            current_txn.reset(token)
        got = {c.name: (c.op, c.data, full) for c, full in txn.changes()}
        assert got == {"fresh": (R.SET, b"[1]", b"[1]"), "v": (R.SET, b"2", b"2")}
    finally:
        store.close()


# -- i. regressions: catching up while a record is in parts, forged headers, garbage at the end -------------
async def _append_in_parts(p: Peer, u: bytes, txn: Txn, fid: str,
                           between: Callable[[int, int], Any]) -> Any:
    """Append ``txn``'s commit part by part, as ``UnitSync.append`` does, awaiting ``between(i, n)`` after
    part ``i`` of ``n`` is in the log; the entry (not applied to ``p``'s copy yet)."""
    pend = p.sync.prepare(u, txn.base, fid, "m", 0, txn.changes(), b"null")
    assert len(pend.parts) >= 3  # a record in several parts, or the test shows nothing
    subject = p.log.subject(u)
    prev = pend.expected
    seqs: list[int] = []
    for i, (data, headers) in enumerate(pend.parts):
        seq = await p.log._append_one(subject, data, p.log.headers_for(headers, prev, f"{pend.msg_id}:{i}"),
                                      time.time() + 30)
        seqs.append(seq)
        prev = seq
        await between(i, len(pend.parts))
    return p.sync.appended(pend, seqs)


async def _versions(p: Peer, u: bytes) -> list[int]:
    entries, skipped = await p.records(u)
    assert skipped == 0
    return [e.record.version for e in entries]


@pytest.mark.parametrize("after_part", [0, 1])
async def test_a_catch_up_between_the_parts_of_a_record_then_gets_the_whole_record(peers, after_part):
    """Node b catches up while a's record is half in the log: it must read that record again from its
    first part later (not treat the half it saw as done), so it never commits a second version 2."""
    a, b = await peers("a", 1024), await peers("b", 1024)
    u = K.unit("mid", "A")
    assert await a.call(u, _set("n", "v1"), fid="fa1") == 1
    await b.sync.catch_up(u)
    assert b.state(u) == a.state(u)
    big = "x" * 2500
    seen_mid: list[tuple[int, int, dict[str, Any]]] = []

    async def between(i: int, n: int) -> None:
        if i == after_part:
            await b.sync.catch_up(u)  # b sees only the first part(s) of a's version 2
            seen_mid.append(b.state(u))

    entry = await _append_in_parts(a, u, a.txn(u, _set("n", big)), "fa2", between)
    await a.sync.apply(u, entry)
    assert a.state(u)[:2] == (2, entry.seq) and a.state(u)[2]["n"] == big
    assert seen_mid and seen_mid[0][0] == 1 and seen_mid[0][2] == {"n": "v1"}  # nothing of the half applied
    await b.sync.catch_up(u)
    assert b.state(u) == a.state(u)  # the complete record: version 2, a's objects
    assert b.store.find_future("fa2") is not None and b.store.find_future("fa2")[0]["v"] == 2
    assert b.sync.counts["skipped"] == 0
    assert await b.call(u, _set("other", 1), fid="fb3") == 3  # v + 1, not a second version 2
    assert await _versions(a, u) == [1, 2, 3]  # strictly consecutive in the log
    c = await peers("c", 1024)
    await c.sync.catch_up(u)  # a fresh node reads the whole log without a "jump" error
    assert c.state(u) == b.state(u) and c.state(u)[2] == {"n": big, "other": 1}
    await a.sync.catch_up(u)
    assert a.state(u) == b.state(u)


async def test_a_nodes_own_record_is_applied_after_catch_ups_during_and_after_its_parts(peers):
    """A node's own acknowledged commit is not skipped because catch-ups (mid-record and after the last
    part) ran before it applied it."""
    a = await peers("a", 1024)
    u = K.unit("own", "A")
    assert await a.call(u, _set("n", "v1"), fid="fa1") == 1
    big = "y" * 2500

    async def between(i: int, n: int) -> None:
        if i == 0 or i == n - 1:  # e.g. `nalar state show` while the commit is in parts, and once more after
            await a.sync.catch_up(u)

    entry = await _append_in_parts(a, u, a.txn(u, _set("n", big)), "fa2", between)
    await a.sync.apply(u, entry)  # the caller is told ok
    assert a.state(u)[:2] == (2, entry.seq) and a.state(u)[2]["n"] == big
    got = a.store.find_future("fa2")
    assert got is not None and got[0]["v"] == 2
    assert await a.call(u, _set("m", 1), fid="fa3") == 3
    assert await _versions(a, u) == [1, 2, 3]
    fresh = await peers("fresh", 1024)
    await fresh.sync.catch_up(u)
    assert fresh.state(u) == a.state(u)


@pytest.mark.parametrize("forged", ["prev-and-huge-base", "huge-base-no-prev", "base-on-a-delta"])
async def test_a_forged_base_header_on_the_last_message_does_not_wipe_the_unit(peers, forged):
    a = await peers("a")
    u = K.unit("forge", "A")
    for i in range(5):
        assert await a.call(u, _append("l", i), fid=f"k{i}") == i + 1
    last = await a.log.last(u)
    headers = {"prev-and-huge-base": {H_PREV: str(last.seq), H_BASE: "999999"},
               "huge-base-no-prev": {H_BASE: "999999"},
               "base-on-a-delta": {H_PREV: str(last.seq), H_BASE: "3"}}[forged]  # a base that is no snapshot
    await a.js.publish(a.log.subject(u), b"garbage", headers=headers)
    b = await peers("b")
    await b.sync.catch_up(u)
    assert b.state(u)[0] == 5 and b.state(u)[2] == {"l": [0, 1, 2, 3, 4]}  # the real state, not an empty copy
    assert b.store.find_future("k0") is not None
    await a.sync.catch_up(u)
    assert a.state(u) == b.state(u)
    assert await a.call(u, _append("l", "new"), fid="knew") == 6  # the sequence goes on
    assert await b.call(u, _append("l", "b"), fid="kb") == 7
    await a.sync.catch_up(u)
    assert a.state(u) == b.state(u) and a.state(u)[2]["l"] == [0, 1, 2, 3, 4, "new", "b"]
    entries, _ = await a.records(u)
    assert [e.record.version for e in entries] == list(range(1, 8))
    c = await peers("c")
    await c.sync.catch_up(u)
    assert c.state(u) == a.state(u)


async def test_headerless_garbage_after_the_last_record_is_skipped_by_a_current_copy(peers, monkeypatch):
    """Older messages discarded (no snapshot to start over from): a current copy must pass over the
    garbage that follows it, not take it for a gap."""
    monkeypatch.setattr(L, "MAX_PER_UNIT", 20)  # stands in for 4096: the same path, less to write
    a, b = await peers("a"), await peers("b")
    u = K.unit("wedge", "A")
    for i in range(30):
        await a.call(u, _append("l", i), fid=f"w{i}")
        if i % 5 == 4:
            await b.sync.catch_up(u)  # b follows the log while it still chains on b's copy
    assert a.sync.counts["snapshots"] == 0
    msgs = await a.log.read(u, 1, (await a.log.last(u)).seq)
    assert msgs[0].seq > 1  # the first records are gone from the log
    assert b.state(u) == a.state(u)
    await a.js.publish(a.log.subject(u), b"garbage")  # no headers at all
    for p in (a, b):
        read, skipped = p.sync.counts["read_messages"], p.sync.counts["skipped"]
        await p.sync.catch_up(u)  # no StateError
        assert p.state(u)[0] == 30 and p.state(u)[2]["l"] == list(range(30))
        assert p.sync.counts["read_messages"] - read == 1  # just the garbage, no start over
        assert p.sync.counts["skipped"] - skipped == 1
    assert await a.call(u, _append("l", "x"), fid="wx") == 31
    assert await b.call(u, _append("l", "y"), fid="wy") == 32
    await a.sync.catch_up(u)
    assert a.state(u) == b.state(u) and a.state(u)[2]["l"] == [*range(30), "x", "y"]
    entries, skipped = await a.records(u)
    vs = [e.record.version for e in entries]
    assert vs == list(range(vs[0], 33)) and skipped <= 1
