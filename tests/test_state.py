"""Session state: managed objects, versions, exactly-once commits, the store's failure modes.

The log itself (fencing, catching up, snapshots, parts, garbage on a unit's subject) is tested against
a real JetStream in tests/test_state_log.py; this file has the store and committer on their own, the
local log, and the behaviour users see through real node processes.
"""
from __future__ import annotations

import asyncio
import threading
import time

import lmdb
import orjson
import pytest
from pathlib import Path

import nalar
from nalar.state import keys as K
from nalar.state.committer import Apply, Committer, Entry
from nalar.state.log import Fenced, LocalLog
from nalar.state.managed import Txn, current_txn, managed_list, managed_value
from nalar.state.record import DELTA, EXTEND, SET, SNAPSHOT, Change, Record
from nalar.state.store import Store
from nalar.state.sync import UnitSync
from conftest import wait_for

STATE_KEYS = {"path", "map_size", "units", "commit_batches", "commit_ops", "log", "stream", "replicas", "appends",
              "fenced", "resent", "caught_up", "read_messages", "read_bytes", "skipped", "snapshots",
              "appended_bytes", "conflicts", "stale_reads", "unknown", "answered_from_log"}


# -- the store and its committer on their own ----------------------------------------------------------
def _rec(version: int, fid: str, writes: dict[str, bytes], reply: bytes = b'{"v":1}', op: str = SET,
         kind: str = DELTA, at: float | None = None) -> Record:
    return Record(version, fid, "m", 0, "test", kind, [Change(n, op, d) for n, d in writes.items()], reply, [],
                  time.time() if at is None else at)


def _apply(committer: Committer, unit: bytes, entries: list[Entry], upto: int | None = None,
           reset: bool = False):
    box: list = []
    ev = threading.Event()

    def done(out):
        box.append(out)
        ev.set()

    if upto is None:
        upto = entries[-1].seq if entries else 0
    committer.submit(Apply(unit, entries, upto, reset, done))
    assert ev.wait(30)
    return box[0]


def _one(seq: int, version: int, fid: str, writes: dict[str, bytes], **kw) -> list[Entry]:
    return [Entry(seq, seq, 1, _rec(version, fid, writes, **kw))]


def test_apply_builds_the_copy_and_skips_what_it_already_has(tmp_path):
    store = Store(str(tmp_path / "s"), sync=False)
    committer = Committer(store)
    u = K.unit("s1", "Counter")
    try:
        assert _apply(committer, u, _one(1, 1, "f1", {"n": b"1"})) == ("ok", 1, 1)
        # the same entry again (a catch-up and the node's own commit both carry it): skipped
        assert _apply(committer, u, _one(1, 1, "f1", {"n": b"99"}, reply=b'"other"')) == ("ok", 1, 1)
        assert store.load(u, "n") == (b"1", 1)
        assert store.find_future("f1")[1] == b'{"v":1}'
        # appends to a list are applied on top of what is there
        assert _apply(committer, u, _one(2, 2, "f2", {"l": b"[1,2]"})) == ("ok", 2, 2)
        assert _apply(committer, u, _one(3, 3, "f3", {"l": b'[3,"x,]"]'}, op=EXTEND)) == ("ok", 3, 3)
        assert orjson.loads(store.load(u, "l")[0]) == [1, 2, 3, "x,]"]
        # a version that does not follow on is refused, and nothing of it lands
        out = _apply(committer, u, _one(5, 5, "f5", {"n": b"5"}))
        assert out[0] == "error" and "jumps from version 3 to 5" in str(out[1])
        assert store.head(u)["v"] == 3 and store.find_future("f5") is None and store.load(u, "n") == (b"1", 1)
        # a sequence beyond the last record (a record still being appended) moves the copy's sequence only
        assert _apply(committer, u, [], upto=9) == ("ok", 3, 9)
        assert _apply(committer, u, _one(10, 4, "f4", {"n": b"4"})) == ("ok", 4, 10)
        assert [(e["version"], e["f"], e["s"]) for e in store.log(u)] == [(1, "f1", 1), (2, "f2", 2), (3, "f3", 3),
                                                                         (4, "f4", 10)]
    finally:
        committer.stop()
        store.close()


def test_history_is_compacted_to_its_window(tmp_path):
    store = Store(str(tmp_path / "s"), history=5, dedup_window=0, sync=False)
    committer = Committer(store)
    u = K.unit("s1", "A")
    try:
        for i in range(1, 21):
            assert _apply(committer, u, _one(i, i, f"f{i}", {"n": str(i).encode()})) == ("ok", i, i)
        assert [e["version"] for e in store.log(u)] == [16, 17, 18, 19, 20]
        assert store.find_future("f15") is None and store.find_future("f16") is not None
        assert [f for f, _, _ in store.recent_futures(u, 3)] == ["f18", "f19", "f20"]
        assert store.load(u, "n") == (b"20", 20)
    finally:
        committer.stop()
        store.close()


def test_futures_are_kept_for_the_dedup_window_whatever_the_count(tmp_path):
    """A hot session commits far more than ``history`` versions while a retry is on its way: a future
    younger than the window is still recognised, one older and beyond the count is forgotten."""
    store = Store(str(tmp_path / "s"), history=5, dedup_window=60, sync=False)
    committer = Committer(store)
    u = K.unit("hot", "A")
    now = time.time()
    try:
        for i in range(1, 41):  # 1..10 two minutes old, the rest just now
            at = now - 120 if i <= 10 else now
            assert _apply(committer, u, _one(i, i, f"f{i}", {"n": str(i).encode()}, at=at)) == ("ok", i, i)
        assert [e["version"] for e in store.log(u)] == list(range(11, 41))
        assert store.find_future("f10") is None and store.find_future("f11") is not None
        for i in range(41, 49):  # an hour on: the rest leave too, a few per commit
            assert _apply(committer, u, _one(i, i, f"f{i}", {"n": b"0"}, at=now + 3600))[0] == "ok"
        assert [e["version"] for e in store.log(u)] == list(range(41, 49))
        assert store.find_future("f40") is None and store.find_future("f41") is not None
    finally:
        committer.stop()
        store.close()


def test_the_dedup_window_is_bounded_whatever_the_records_times_say(tmp_path):
    """A record stamped in the future (a node's clock ahead) must not keep every later version: the
    window holds at most ``MAX_WINDOW_FACTOR`` x ``history`` versions; ``recent_futures`` reads only
    the newest, however many the window holds."""
    from nalar.state.committer import MAX_WINDOW_FACTOR

    store = Store(str(tmp_path / "s"), history=2, dedup_window=1e6, sync=False)
    committer = Committer(store)
    u, other = K.unit("skew", "A"), K.unit("skew", "B")
    now = time.time()
    try:
        assert _apply(committer, other, _one(1, 1, "o1", {"n": b"1"}))[0] == "ok"  # a unit after it in the store
        for i in range(1, 201):
            at = now + 3600 if i == 3 else now
            assert _apply(committer, u, _one(i, i, f"f{i}", {"n": b"0"}, at=at))[0] == "ok"
        cap = 2 * MAX_WINDOW_FACTOR
        assert [e["version"] for e in store.log(u)] == list(range(201 - cap, 201))
        assert store.find_future("f3") is None and store.find_future(f"f{201 - cap}") is not None
        assert [f for f, _, _ in store.recent_futures(u, 3)] == ["f198", "f199", "f200"]
        assert [f for f, _, _ in store.recent_futures(other, 5)] == ["o1"]
    finally:
        committer.stop()
        store.close()


def test_a_bad_dedup_window_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NALAR_STATE_DEDUP_WINDOW", "soon")
    with pytest.raises(nalar.StateError, match="NALAR_STATE_DEDUP_WINDOW='soon': expected a number of seconds"):
        Store(str(tmp_path / "s"), sync=False)


def test_the_map_grows_and_a_full_store_is_a_clear_error(tmp_path):
    store = Store(str(tmp_path / "s"), map_size=256 * 1024, max_map_size=4 * 1024 * 1024, sync=False)
    committer = Committer(store)
    u = K.unit("s1", "A")
    big = b'"' + b"x" * (1024 * 1024) + b'"'
    try:
        assert _apply(committer, u, _one(1, 1, "f1", {"a": big}))[0] == "ok"  # 1 MiB into a 256 KiB map: it grew
        assert store.map_size() > 256 * 1024
        out = _apply(committer, u, _one(2, 2, "f2", {"b": b'"' + b"y" * (8 * 1024 * 1024) + b'"'}))
        assert out[0] == "error" and isinstance(out[1], nalar.StateFull) and "full" in str(out[1])
        assert store.load(u, "a") == (big, 1)  # nothing half-written, nothing lost
        assert store.head(u)["v"] == 1 and store.find_future("f2") is None
        assert _apply(committer, u, _one(2, 2, "f3", {"c": b"1"})) == ("ok", 2, 2)
    finally:
        committer.stop()
        store.close()


def test_a_full_store_fails_only_the_commits_that_do_not_fit(tmp_path):
    """A batch that fills the map at its maximum is split: the small ops of the batch still land."""
    store = Store(str(tmp_path / "s"), map_size=1024 * 1024, max_map_size=1024 * 1024, sync=False)
    committer = Committer(store)
    outs: dict[str, object] = {}
    ev = threading.Event()

    def done_for(name):
        def done(out):
            outs[name] = out
            if len(outs) == 3:
                ev.set()
        return done

    huge = b'"' + b"z" * (2 * 1024 * 1024) + b'"'
    ops = [Apply(K.unit("small1", "A"), _one(1, 1, "g1", {"n": b"1"}), 1, False, done_for("small1")),
           Apply(K.unit("huge", "A"), _one(1, 1, "g2", {"n": huge}), 1, False, done_for("huge")),
           Apply(K.unit("small2", "A"), _one(1, 1, "g3", {"n": b"2"}), 1, False, done_for("small2"))]
    try:
        for op in ops:  # queued together: one batch
            committer.submit(op)
        assert ev.wait(30)
        assert outs["small1"] == ("ok", 1, 1) and outs["small2"] == ("ok", 1, 1)
        assert outs["huge"][0] == "error" and isinstance(outs["huge"][1], nalar.StateFull)
        assert store.head(K.unit("huge", "A")) is None
    finally:
        committer.stop()
        store.close()


def test_garbage_in_the_store_is_a_clear_error(tmp_path):
    path = str(tmp_path / "s")
    store = Store(path, sync=False)
    committer = Committer(store)
    u = K.unit("s1", "A")
    assert _apply(committer, u, _one(1, 1, "f1", {"n": b"1"}))[0] == "ok"
    committer.stop()
    store.close()
    env = lmdb.open(path, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(K.head(u), b"\x00\xffgarbage")
        txn.put(K.future("fg"), b"not json\nbody")
    env.close()
    store = Store(path, sync=False)
    committer = Committer(store)
    try:
        with pytest.raises(nalar.StateError, match="garbage"):
            store.load(u, "n")
        with pytest.raises(nalar.StateError, match="garbage"):
            store.find_future("fg")
        out = _apply(committer, u, _one(2, 2, "f2", {"n": b"2"}))
        assert out[0] == "error" and isinstance(out[1], nalar.StateError)
        assert _apply(committer, K.unit("s2", "A"), _one(1, 1, "f3", {"n": b"1"}))[0] == "ok"  # others unaffected
        # catching up from a snapshot starts the copy over: the garbage is replaced, not read
        assert _apply(committer, u, _one(7, 2, "f4", {"n": b"2"}, kind=SNAPSHOT), reset=True) == ("ok", 2, 7)
        assert store.load(u, "n") == (b"2", 2)
    finally:
        committer.stop()
        store.close()


def test_a_store_of_an_older_layout_is_set_aside_not_misread(tmp_path):
    path = str(tmp_path / "old")
    env = lmdb.open(path, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"hs1\x00A", b'{"v":3,"o":{"n":3}}')  # a unit of the old layout, no layout key
    env.close()
    with pytest.raises(nalar.StateError, match="has layout None"):
        Store(path)


def _layout1_store(path: Path) -> None:
    """A store as nalar wrote it before the log: a Counter unit at version 3, its future of version 3."""
    import struct

    v = struct.Struct(">Q")
    env = lmdb.open(str(path), subdir=True)
    with env.begin(write=True) as txn:
        u = b"old-s\x00Counter"
        txn.put(b"h" + u, b'{"v":3,"o":{"n":3}}')
        txn.put(b"o" + u + b"\x00n\x00" + v.pack(2), b"2")
        txn.put(b"o" + u + b"\x00n\x00" + v.pack(3), b"3")
        txn.put(b"l" + u + b"\x00" + v.pack(3), b'{"f":"old-fut-3","m":"incr","t":1.0,"w":["n"],"s":[],"a":0}')
        txn.put(b"f" + b"old-fut-3", b'{"u":["old-s","Counter"],"v":3}\n' + env_result(3))
    env.close()


def env_result(value: object) -> bytes:
    from nalar.bus import envelope

    return envelope.encode_result(value)


def test_a_node_upgraded_in_place_puts_its_old_store_into_the_log(start_node, client, tmp_path):
    path = tmp_path / "state" / "up"
    path.parent.mkdir(parents=True)
    _layout1_store(path)
    start_node("sample_actors:Counter", name="up")
    c = client.stub("Counter").options(session="old-s")
    assert c.get().result(30) == 3  # the state it had
    assert c.incr().result(30) == 4  # and it goes on from there, in the log
    assert client.state_log("old-s")["units"]["Counter"][-1]["version"] == 4
    # a retry of a call the old store had committed is still recognised: its answer, no second effect
    assert client.stub("Counter").options(session="old-s", key="old-fut-3").incr().result(30) == 3
    assert c.get().result(30) == 4
    kept = [p for p in path.parent.iterdir() if p.name.startswith("up.layout1-")]
    assert len(kept) == 1 and (kept[0] / "data.mdb").exists()  # the old store is kept, not deleted
    start_node("sample_actors:Counter", name="other")  # a node that never had it reads it from the log
    assert client.stub("Counter").options(session="old-s").get().result(30) == 4


# -- the local log (no JetStream): the node's LMDB is the only copy -------------------------------------
def _change(store: Store, u: bytes, fn) -> Txn:
    txn = Txn(store, u)
    token = current_txn.set(txn)
    try:
        fn()
    finally:
        current_txn.reset(token)
    return txn


def test_the_local_log_fences_commits_on_a_stale_base_and_survives_a_restart(tmp_path):
    path = str(tmp_path / "local")
    u = K.unit("s", "A")

    async def first() -> None:
        store = Store(path, sync=False)
        committer = Committer(store)
        sync = UnitSync("n", LocalLog(lambda x: (store.head(x) or {"s": 0})["s"]), store, committer, 4096)
        try:
            a = _change(store, u, lambda: managed_list("l").append("a"))
            b = _change(store, u, lambda: managed_list("l").append("b"))  # the same base as a
            assert await sync.commit(u, a.base, "fa", "m", 0, a.changes(), b"1", time.time() + 30) == 1
            with pytest.raises(Fenced):
                await sync.commit(u, b.base, "fb", "m", 0, b.changes(), b"1", time.time() + 30)
            b = _change(store, u, lambda: managed_list("l").append("b"))
            (change, _), = b.changes()
            assert change.op == EXTEND and change.data == b'["b"]'  # an append records only the new item
            assert await sync.commit(u, b.base, "fb", "m", 0, b.changes(), b"2", time.time() + 30) == 2
        finally:
            committer.stop()
            store.close()

    async def again() -> None:  # a new process on the same store: the log starts from the copy's sequence
        store = Store(path, sync=False)
        committer = Committer(store)
        sync = UnitSync("n", LocalLog(lambda x: (store.head(x) or {"s": 0})["s"]), store, committer, 4096)
        try:
            assert await sync.catch_up(u) == 0
            c = _change(store, u, lambda: setattr(managed_value("v", 0), "value", 7))
            assert await sync.commit(u, c.base, "fc", "m", 0, c.changes(), b"3", time.time() + 30) == 3
            assert orjson.loads(store.load(u, "l")[0] or b"null") == ["a", "b"] and store.load(u, "v") == (b"7", 3)
            assert [e["f"] for e in store.log(u)] == ["fa", "fb", "fc"]
        finally:
            committer.stop()
            store.close()

    asyncio.run(first())
    asyncio.run(again())


# -- local mode ------------------------------------------------------------------------------------------
def test_local_mode_state_persists_across_calls_and_a_raise_commits_nothing(tmp_path):
    from sample_actors import Counter

    with nalar.local(Counter) as app:
        c = app.stub(Counter).options(session="alice")
        assert [c.incr().result(30) for _ in range(5)] == [1, 2, 3, 4, 5]
        assert app.stub(Counter).options(session="bob").incr(10).result(30) == 10
        with pytest.raises(nalar.RemoteError, match="changed my mind"):
            c.incr_then_fail().result(30)
        assert c.get().result(30) == 5  # the failed call's +100 never landed
        assert c.note("a").result(30) == 1 and c.note("b").result(30) == 2
        assert c.notes().result(30) == ["a", "b"]


def test_local_mode_state_persists_across_restarts_on_its_state_dir(tmp_path):
    from sample_actors import Counter

    d = str(tmp_path / "state")
    with nalar.local(Counter, state_dir=d) as app:
        c = app.stub(Counter).options(session="alice")
        assert [c.incr().result(30) for _ in range(3)] == [1, 2, 3]
        c.note("kept").result(30)
    with nalar.local(Counter, state_dir=d) as app:
        c = app.stub(Counter).options(session="alice")
        assert c.get().result(30) == 3 and c.notes().result(30) == ["kept"]
        assert c.incr().result(30) == 4  # the next version follows on: the local log started from the copy


def test_managed_state_needs_a_session_and_a_stateful_actor():
    from sample_actors import Counter, NotStateful

    with nalar.local(Counter, NotStateful) as app:
        with pytest.raises(nalar.RemoteError, match="session"):
            app.stub(Counter).incr().result(30)
        with pytest.raises(nalar.RemoteError, match="stateful"):
            app.stub(NotStateful).options(session="s").touch().result(30)


# -- node processes -----------------------------------------------------------------------------------------
def test_concurrent_increments_over_many_sessions_end_exactly_right(start_node, client):
    start_node("sample_actors:Counter=2", "sample_actors:AsyncCounter", name="s1")
    sessions, per = 40, 15
    futures = []
    for i in range(per):
        for s in range(sessions):
            futures.append(client.stub("Counter").options(session=f"sess-{s}").incr())
            futures.append(client.stub("AsyncCounter").options(session=f"sess-{s}").incr(2))
    nalar.gather(futures).result(120)
    for s in range(sessions):
        assert client.stub("Counter").options(session=f"sess-{s}").get().result(30) == per
    # each future committed exactly once: versions == calls, log lists each id once
    log = client.state_log("sess-0")
    entries = log["units"]["Counter"]
    assert len(entries) == per and len({e["f"] for e in entries}) == per
    assert log["units"]["AsyncCounter"][-1]["version"] == per
    st = client.status()[0]["state"]
    assert STATE_KEYS <= set(st) and st["log"] == "jetstream"
    assert st["appends"] == 2 * sessions * per and st["fenced"] == 0 and st["conflicts"] == 0


def test_sessions_spread_over_two_nodes_stay_one_lineage(start_node, client):
    """Homes off: a session's calls land on either node. A node whose copy is stale has its commit fenced
    (or its read found stale), catches up from the log and runs the call again: no update is lost."""
    off = {"NALAR_SESSION_HOMES": "off"}
    start_node("sample_actors:Counter", name="na", env=off)
    start_node("sample_actors:Counter", name="nb", env=off)
    sessions, per = 8, 10
    for i in range(per):
        nalar.gather([client.stub("Counter").options(session=f"m-{s}").incr() for s in range(sessions)]).result(120)
    for _ in range(2):
        for s in range(sessions):
            assert client.stub("Counter").options(session=f"m-{s}").get().result(30) == per
    for s in range(sessions):
        log = client.state_log(f"m-{s}")["units"]["Counter"]
        assert [e["version"] for e in log] == list(range(1, per + 1))
        assert len({e["f"] for e in log}) == per
    st = {x["node"]: x["state"] for x in client.status()}
    assert set(st) == {"na", "nb"}
    assert st["na"]["appends"] > 0 and st["nb"]["appends"] > 0  # both nodes committed
    assert st["na"]["appends"] + st["nb"]["appends"] == sessions * per  # and each call exactly once
    assert st["na"]["fenced"] + st["nb"]["fenced"] > 0  # stale copies were refused by the log ...
    assert st["na"]["caught_up"] + st["nb"]["caught_up"] > 0  # ... and caught up
    assert st["na"]["stale_reads"] + st["nb"]["stale_reads"] > 0  # reads were checked against the log


def test_a_10mb_session_migrates_between_node_processes(start_node, client):
    off = {"NALAR_SESSION_HOMES": "off"}
    nodes = {"src": start_node("sample_actors:Counter", name="src", env=off),
             "dst": start_node("sample_actors:Counter", name="dst", env=off)}
    c = client.stub("Counter").options(session="big")
    size = 10 * 1024 * 1024
    assert c.put_blob(size).result(60) == size
    st = {x["node"]: x["state"] for x in client.status()}
    holder = max(st, key=lambda n: st[n]["appends"])
    other = "dst" if holder == "src" else "src"
    assert st[holder]["appends"] == 1 and st[holder]["appended_bytes"] > size
    out = client.migrate("big", holder, other)
    assert out["moved"] == ["Counter"] and out["bytes"] > size and out["to"] == other and out["from"] == holder
    shown = client.state_show("big")
    assert shown["units"]["Counter"]["objects"]["blob"]["$large"] > size  # summarised, not shipped
    nodes[holder].stop()  # the writer is gone: its copy is not needed, the log has the state
    read_before = [x for x in client.status() if x["node"] == other][0]["state"]["read_bytes"]
    assert c.blob().result(60) == {"len": size, "sum": size}  # the next call sees all of it
    assert c.where().result(30) == nodes[other].proc.pid
    after = [x for x in client.status() if x["node"] == other][0]["state"]
    assert after["read_bytes"] == read_before  # the migration had warmed it: the call read nothing more


def test_a_node_back_on_an_empty_state_dir_catches_up_from_the_log(start_node, client, nats_url, namespace,
                                                                 tmp_path):
    from conftest import NodeProc, node_env

    def start(d: str) -> NodeProc:
        p = NodeProc(["sample_actors:Counter", "--nats", nats_url, "--namespace", namespace, "--name", "lost",
                      "--grace", "1", "--state-dir", str(tmp_path / d)], node_env())
        p.wait_ready()
        return p

    node = start("disk-1")
    try:
        c = client.stub("Counter").options(session="survivor")
        assert [c.incr().result(30) for _ in range(3)] == [1, 2, 3]
        c.note("kept").result(30)
    finally:
        node.stop()
    node = start("disk-2")  # the same name on an empty disk (its old disk is lost)
    try:
        assert c.get().result(30) == 3 and c.notes().result(30) == ["kept"]
        assert c.incr().result(30) == 4
        assert [e["version"] for e in client.state_log("survivor")["units"]["Counter"]] == [1, 2, 3, 4, 5]
    finally:
        node.stop()


def test_kill_9_mid_flight_then_restart_every_call_completes_exactly_once(nats_url, namespace, client, tmp_path):
    """At-least-once execution, exactly-once effect: retried calls whose commit landed are not re-applied."""
    from conftest import NodeProc, node_env

    args = ["sample_actors:SlowCounter", "--nats", nats_url, "--namespace", namespace, "--name", "victim",
            "--state-dir", str(tmp_path / "victim"), "--grace", "1"]
    node = NodeProc(args, node_env())
    node.wait_ready()
    policy = nalar.RetryPolicy(attempts=30, backoff=0.2, max_backoff=1.0, attempt_timeout=2.0)
    stub = client.stub("SlowCounter").options(retry=policy, timeout=120)
    sessions, per = 10, 40
    calls = [(s, stub.options(session=f"k-{s}").incr()) for _ in range(per) for s in range(sessions)]
    wait_for(lambda: sum(f.available() for _, f in calls) >= 40, what="some calls to complete")
    node.proc.kill()  # SIGKILL: no goodbye, no flush beyond what LMDB already made durable
    node.proc.wait()
    in_flight = sum(not f.available() for _, f in calls)
    assert in_flight >= 200
    node = NodeProc(args, node_env())  # the same node comes back on the same store
    node.wait_ready()
    try:
        nalar.gather([f for _, f in calls]).result(120)
        for s in range(sessions):
            assert stub.options(session=f"k-{s}").get().result(30) == per
        for s in range(sessions):
            entries = client.state_log(f"k-{s}")["units"]["SlowCounter"]
            ids = [e["f"] for e in entries]
            mine = {f.id for t, f in calls if t == s}
            assert len(ids) == len(set(ids)) == per and set(ids) == mine  # every future exactly once
            assert [e["version"] for e in entries] == list(range(1, per + 1))
        assert client.runtime.counters.get("retries", 0) >= in_flight
    finally:
        node.stop()


def test_state_cli_show_log_and_migrate(start_node, client, nats_url, namespace):
    import json
    import subprocess
    import sys

    start_node("sample_actors:Counter", name="c1")
    start_node("sample_actors:Counter", name="c2")
    c = client.stub("Counter").options(session="cli-s")
    for text in ("alpha", "beta"):
        c.note(text).result(30)
    c.incr(5).result(30)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nalar.cli.main", "state", *args, "--nats", nats_url,
                               "--namespace", namespace], capture_output=True, text=True, timeout=60)

    r = cli("show", "cli-s")
    assert r.returncode == 0, r.stderr
    assert '"alpha"' in r.stdout and "n @v3 = 5" in r.stdout and "version 3" in r.stdout
    r = cli("log", "cli-s", "--json")
    log = json.loads(r.stdout)["units"]["Counter"]
    assert [(e["version"], e["m"], e["w"]) for e in log] == [(1, "note", ["notes"]), (2, "note", ["notes"]),
                                                            (3, "incr", ["n"])]
    st = {x["node"]: x["state"] for x in client.status()}
    holder = max(st, key=lambda n: st[n]["appends"])
    other = "c2" if holder == "c1" else "c1"
    r = cli("migrate", "cli-s", "--from", holder, "--to", other)
    assert r.returncode == 0, r.stderr
    assert f"moved Counter of session 'cli-s' from {holder} to {other}" in r.stdout, r.stdout
    assert c.notes().result(30) == ["alpha", "beta"]
    r = cli("migrate", "no-such-session", "--from", holder, "--to", other)
    assert r.returncode == 0 and "moved nothing" in r.stdout, r.stdout + r.stderr
    r = cli("show", "no-such-session")
    assert r.returncode == 1 and "no node holds" in r.stdout


def test_migrating_to_two_nodes_at_once_leaves_one_lineage(start_node, client):
    """A migration only warms its destination: two at once both succeed, and the session goes on."""
    import concurrent.futures

    for n in ("ha", "hb", "hc"):
        start_node("sample_actors:Counter", name=n)
    c = client.stub("Counter").options(session="one")
    assert c.incr().result(30) == 1
    st = {x["node"]: x["state"] for x in client.status()}
    holder = max(st, key=lambda n: st[n]["appends"])
    others = [n for n in ("ha", "hb", "hc") if n != holder]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        outcomes = list(ex.map(lambda dst: client.migrate("one", holder, dst), others))
    assert sorted(o["to"] for o in outcomes) == sorted(others)
    assert all(o["moved"] == ["Counter"] for o in outcomes)
    values = [c.incr().result(30) for _ in range(12)]
    assert values == list(range(2, 14))  # one lineage: no counter goes back
    log = client.state_log("one")["units"]["Counter"]
    assert [e["version"] for e in log] == list(range(1, 14))


def test_a_pull_of_a_bad_session_id_is_a_clear_error(start_node, client):
    start_node("sample_actors:Counter", name="p1")
    with pytest.raises(nalar.RemoteError, match="session id for state"):
        client.migrate("é" * 200, "p0", "p1")
    with pytest.raises(nalar.RemoteError, match="needs a 'session'"):
        client.migrate("", "p0", "p1")
    assert client.migrate("fresh", "p0", "p1")["moved"] == []


def test_a_stateful_sessions_calls_run_one_at_a_time_in_order(start_node, client):
    start_node("sample_actors:Ordered", name="ord")
    stubs = {s: client.stub("Ordered").options(session=s) for s in ("A", "B", "C")}
    futures = [stubs[s].step(i) for i in range(25) for s in stubs]
    nalar.gather(futures).result(60)
    for s, stub in stubs.items():
        assert stub.seen().result(30) == list(range(25))  # arrival order, nothing lost, nothing twice
    peaks = client.stub("Ordered").options(session="A").peaks().result(30)
    assert all(v == 1 for v in peaks["per_session"].values())  # never two calls of one session at once
    assert peaks["overall"] >= 2  # while different sessions did run together


def test_a_waiting_call_that_expires_does_not_pass_the_turn_on(start_node, client):
    """Only the call holding a unit's turn may hand it to the next one."""
    start_node("sample_actors:Ordered", name="turns")
    o = client.stub("Ordered").options(session="T")
    first = o.hold(1, 1.5)
    doomed = o.options(timeout=0.4).hold(2, 0.0)  # waits its turn, and its deadline passes meanwhile
    third = o.hold(3, 0.0)
    with pytest.raises(nalar.DeadlineExceeded):
        doomed.result(30)
    assert first.result(30) == 1 and third.result(30) == 3
    assert o.seen().result(30) == [1, 3]
    assert o.peaks().result(30)["per_session"]["T"] == 1  # the third never ran beside the first


def test_an_overlong_session_for_state_is_a_clear_error(start_node, client):
    start_node("sample_actors:Counter")
    with pytest.raises(nalar.RemoteError, match="session id for state"):
        client.stub("Counter").options(session="é" * 200).incr().result(30)
    assert client.stub("Counter").options(session="short").incr().result(30) == 1


def test_a_stateful_call_into_its_own_session_fails_fast(start_node, client):
    start_node("sample_actors:SelfCaller")
    with pytest.raises(nalar.RemoteError, match="would wait for itself"):
        client.stub("SelfCaller").options(session="me", timeout=60).outer().result(20)


# -- regressions: a full store in local mode; deadlines under contention -------------------------------------
def test_local_mode_a_commit_a_full_store_cannot_take_fails_and_the_unit_goes_on(tmp_path, monkeypatch):
    """No JetStream: the LMDB copy is all there is, so a commit it cannot take must fail (StateFull), not
    be acknowledged and lost; and the local log must not be left ahead of the store (every later commit
    refused as a conflict)."""
    from sample_actors import Counter

    monkeypatch.setenv("NALAR_STATE_MAX_MAP", str(4 * 1024 * 1024))
    d = str(tmp_path / "state")
    u = K.unit("s", "Counter")
    with nalar.local(Counter, state_dir=d) as app:
        c = app.stub(Counter).options(session="s", timeout=20)
        assert c.incr().result(20) == 1
        acked = 1
        stored = None
        full = None
        for i in range(12):  # 1.5 MB values into a 4 MiB map: one of them does not fit
            try:
                stored = c.put_blob(1_500_000 + i).result(20)
                acked += 1
            except nalar.StateFull as e:
                full = e
                break
        assert full is not None, "the store never filled up"
        assert stored is not None  # at least one blob fitted before
        assert c.blob().result(20) == {"len": stored, "sum": stored}  # the failed commit left nothing
        assert c.incr().result(20) == 2 and c.incr().result(20) == 3  # smaller commits still land
        assert c.note("after").result(20) == 1
        acked += 3
        assert app.node is not None and app.node.sessions is not None
        store = app.node.sessions.store
        assert [e["version"] for e in store.log(u)] == list(range(1, acked + 1))  # one version per acknowledged call
        st = app.status()[0]["state"]
        assert st["conflicts"] == 0
    with nalar.local(Counter, state_dir=d) as app:  # and that is what the store kept
        c = app.stub(Counter).options(session="s", timeout=20)
        assert c.get().result(20) == 3 and c.notes().result(20) == ["after"]
        assert c.blob().result(20) == {"len": stored, "sum": stored}
        assert c.incr().result(20) == 4


def test_a_call_that_failed_its_deadline_saying_nothing_committed_has_no_effect(start_node, client, nats_url,
                                                                                 namespace):
    """Homes off, three nodes, one session, many calls at once with short deadlines (conflicts and
    re-runs): a call that failed with DeadlineExceeded saying nothing committed (no "unknown" in it)
    never has its effect in the state; every call answered ok has it exactly once."""
    import collections

    off = {"NALAR_SESSION_HOMES": "off"}
    for n in ("d1", "d2", "d3"):
        start_node("sample_actors:Counter", name=n, env=off)
    clients = [client] + [nalar.connect(nats_url, namespace) for _ in range(3)]
    timeouts = (0.02, 0.05, 0.1, 0.3)
    outcome: dict[str, str] = {}
    try:
        end = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < end:
            futs = []
            for j, cl in enumerate(clients):
                for k, to in enumerate(timeouts):
                    tok = f"c{j}:{i}:{k}"
                    futs.append((tok, cl.stub("Counter").options(session="D", timeout=to).note(tok)))
            for tok, f in futs:
                try:
                    f.result(30)
                    outcome[tok] = "ok"
                except nalar.DeadlineExceeded as e:
                    outcome[tok] = "unknown" if "unknown" in str(e) else "nothing"
                except Exception as e:  # any other failure is recorded, and fails the test below
                    outcome[tok] = f"{type(e).__name__}: {e}"
            i += 1
        final = client.stub("Counter").options(session="D", timeout=30).notes().result(60)
    finally:
        for cl in clients[1:]:
            cl.close()
    kinds = collections.Counter(o if o in ("ok", "unknown", "nothing") else "other" for o in outcome.values())
    assert kinds["other"] == 0, [o for o in outcome.values() if o not in ("ok", "unknown", "nothing")][:5]
    assert kinds["ok"] > 0 and kinds["nothing"] > 0, kinds  # both happened, or the test shows nothing
    applied_anyway = [t for t in final if outcome[t] == "nothing"]
    assert not applied_anyway, (len(applied_anyway), kinds)
    counts = collections.Counter(final)
    assert all(n == 1 for n in counts.values())  # nothing applied twice
    assert {t for t, o in outcome.items() if o == "ok"} <= set(final)  # nothing acknowledged lost
    assert set(final) <= {t for t, o in outcome.items() if o in ("ok", "unknown")}


def test_a_retry_committed_elsewhere_while_the_call_waited_its_turn_is_answered_not_run_again(
        start_node, client, nats_url, namespace):
    """The same future on two nodes (a retry sent elsewhere): one attempt waits its unit's turn behind a
    held call on nb, the other commits on na. nb's copy takes that commit while catching up for the held
    call's lost race, before the waiting attempt's turn comes; the waiting attempt must then answer
    with that commit's reply, not run on a base that already has its effect (its append would not be
    fenced: the effect twice)."""
    off = {"NALAR_SESSION_HOMES": "off"}
    start_node("sample_actors:HeldNotes", name="na", env=off)
    start_node("sample_actors:HeldNotes", name="nb", env=off)
    other = nalar.connect(nats_url, namespace)
    try:
        for c, node in ((client, "nb"), (other, "na")):  # each client's calls go to one node's own subject
            rt = c.runtime
            rt.route = lambda actor, session, rt=rt, node=node: rt.subjects.call_at(actor, node)  # type: ignore[method-assign]
        on_b = client.stub("HeldNotes").options(session="twice", timeout=60)
        on_a = other.stub("HeldNotes").options(session="twice", timeout=60)
        assert on_b.note("a").result(30) == 1  # nb knows the unit
        held = on_b.hold("x")  # holds the unit's turn on nb
        waiting = on_b.options(key="the-same-future").note("F")  # waits its turn behind it on nb
        assert on_a.options(key="the-same-future").note("F").result(30) == 2  # the retry commits on na
        assert client.stub("HeldNotes").release().result(30) is True
        assert held.result(30) == 3  # fenced, caught up (F is in nb's copy now), ran again on v2
        assert waiting.result(30) == 2  # F's own commit's reply: it did not run again
        assert on_a.notes().result(30) == on_b.notes().result(30) == ["a", "F", "x"]
        ids = [e["f"] for e in client.state_log("twice")["units"]["HeldNotes"]]
        assert len(ids) == len(set(ids)) == 3
    finally:
        other.close()
