"""Session state: managed objects, versions, exactly-once commits, the store's failure modes."""
from __future__ import annotations

import threading

import lmdb
import orjson
import pytest

import nalar
from nalar.state import keys as K
from nalar.state import transfer
from nalar.state.committer import Commit, Committer
from nalar.state.store import Store
from conftest import wait_for


def _commit(committer: Committer, unit: bytes, fid: str, seen: dict, writes: dict, reply: bytes = b'{"v":1}'):
    box: list = []
    ev = threading.Event()

    def done(out):
        box.append(out)
        ev.set()

    committer.submit(Commit(unit, fid, "m", 0, seen, writes, reply, done))
    assert ev.wait(30)
    return box[0]


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


def test_managed_state_needs_a_session_and_a_stateful_actor():
    from sample_actors import Counter, NotStateful

    with nalar.local(Counter, NotStateful) as app:
        with pytest.raises(nalar.RemoteError, match="session"):
            app.stub(Counter).incr().result(30)
        with pytest.raises(nalar.RemoteError, match="stateful"):
            app.stub(NotStateful).options(session="s").touch().result(30)


def test_racing_commits_on_one_object_cannot_both_apply(tmp_path):
    store = Store(str(tmp_path / "s"))
    committer = Committer(store)
    u = K.unit("s1", "Counter")
    assert _commit(committer, u, "f1", {"n": 0}, {"n": b"1"})[0] == "ok"
    # two calls both read version 0 of "n": the first to commit wins, the second conflicts
    a = _commit(committer, u, "f2", {"n": 0}, {"n": b"2"})
    assert a[0] == "conflict"
    assert _commit(committer, u, "f3", {"n": 1}, {"n": b"2"}) == ("ok", 2)
    assert _commit(committer, u, "f4", {"n": 1}, {"n": b"3"})[0] == "conflict"
    # disjoint objects do not conflict
    assert _commit(committer, u, "f5", {"other": 0}, {"other": b"[]"}) == ("ok", 3)
    assert store.load(u, "n") == (b"2", 2)
    committer.stop()
    store.close()


def test_a_committed_future_is_not_applied_twice(tmp_path):
    store = Store(str(tmp_path / "s"))
    committer = Committer(store)
    u = K.unit("s1", "Counter")
    assert _commit(committer, u, "f1", {"n": 0}, {"n": b"1"}, b'{"v":1}') == ("ok", 1)
    again = _commit(committer, u, "f1", {"n": 1}, {"n": b"2"}, b'{"v":2}')
    assert again[0] == "duplicate" and again[2] == b'{"v":1}'  # the stored answer, no new version
    assert store.head(u)["v"] == 1
    assert [e["f"] for e in store.log(u)] == ["f1"]
    committer.stop()
    store.close()


def test_history_is_compacted_to_its_window(tmp_path):
    store = Store(str(tmp_path / "s"), history=5)
    committer = Committer(store)
    u = K.unit("s1", "A")
    for i in range(1, 21):
        assert _commit(committer, u, f"f{i}", {"n": i - 1}, {"n": str(i).encode()}) == ("ok", i)
    log = store.log(u)
    assert [e["version"] for e in log] == [16, 17, 18, 19, 20]
    assert store.find_future("f1") is None and store.find_future("f20") is not None
    versions = [K.version_of(k) for k, _ in store.records(u) if k.startswith(K.obj_prefix(u))]
    assert max(versions) == 20 and len(versions) <= 6
    committer.stop()
    store.close()


def test_the_map_grows_and_a_full_store_is_a_clear_error(tmp_path):
    store = Store(str(tmp_path / "s"), map_size=256 * 1024, max_map_size=4 * 1024 * 1024)
    committer = Committer(store)
    u = K.unit("s1", "A")
    big = b'"' + b"x" * (1024 * 1024) + b'"'
    assert _commit(committer, u, "f1", {"a": 0}, {"a": big})[0] == "ok"  # 1 MiB into a 256 KiB map: it grew
    assert store.map_size() > 256 * 1024
    out = _commit(committer, u, "f2", {"b": 0}, {"b": b'"' + b"y" * (8 * 1024 * 1024) + b'"'})
    assert out[0] == "error" and isinstance(out[1], nalar.StateFull) and "full" in str(out[1])
    assert store.load(u, "a") == (big, 1)  # nothing half-written, nothing lost
    assert _commit(committer, u, "f3", {"c": 0}, {"c": b"1"}) == ("ok", 2)
    committer.stop()
    store.close()


def test_garbage_in_the_store_is_a_clear_error(tmp_path):
    path = str(tmp_path / "s")
    store = Store(path)
    committer = Committer(store)
    u = K.unit("s1", "A")
    assert _commit(committer, u, "f1", {"n": 0}, {"n": b"1"})[0] == "ok"
    committer.stop()
    store.close()
    env = lmdb.open(path, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(K.head(u), b"\x00\xffgarbage")
    env.close()
    store = Store(path)
    with pytest.raises(nalar.StateError, match="garbage"):
        store.load(u, "n")
    committer = Committer(store)
    out = _commit(committer, u, "f2", {"n": 1}, {"n": b"2"})
    assert out[0] == "error" and isinstance(out[1], nalar.StateError)
    assert _commit(committer, K.unit("s2", "A"), "f3", {"n": 0}, {"n": b"1"})[0] == "ok"  # others unaffected
    committer.stop()
    store.close()


def test_garbage_state_transfers_are_rejected_before_anything_is_written():
    u = K.unit("s1", "A")
    good = transfer.pack([(K.head(u), b'{"v":1,"o":{"n":1}}'), (K.obj(u, "n", 1), b"1")])
    assert len(transfer.unpack(good, u)) == 2
    for bad in (b"", b"garbage", good[:-1], good[:10] + b"X" + good[11:], b"NLS1" + b"\x00" * 40):
        with pytest.raises(nalar.StateError, match="bad state transfer"):
            transfer.unpack(bad, u)
    other = transfer.pack([(K.head(u), b'{"v":1,"o":{}}'), (K.head(K.unit("s2", "A")), b"{}")])
    with pytest.raises(nalar.StateError, match="does not belong"):
        transfer.unpack(other, u)


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


def test_sessions_spread_over_two_nodes_follow_their_calls(start_node, client):
    """Calls of one session land on either node (queue group): each pulls the state before running."""
    start_node("sample_actors:Counter", name="na")
    start_node("sample_actors:Counter", name="nb")
    sessions, per = 8, 10
    for i in range(per):
        nalar.gather([client.stub("Counter").options(session=f"m-{s}").incr() for s in range(sessions)]).result(120)
    for s in range(sessions):
        assert client.stub("Counter").options(session=f"m-{s}").get().result(30) == per
    log = client.state_log("m-0")["units"]["Counter"]
    assert [e["version"] for e in log] == list(range(1, per + 1))
    st = {x["node"]: x["state"] for x in client.status()}
    assert st["na"]["pulled"] + st["nb"]["pulled"] > 0  # state really moved


def test_a_10mb_session_migrates_between_node_processes(start_node, client):
    a = start_node("sample_actors:Counter", name="src")
    b = start_node("sample_actors:Counter", name="dst")
    c = client.stub("Counter").options(session="big")
    # make sure the session lives on "src": claim it there by calling until "src" served it
    size = 10 * 1024 * 1024
    assert c.put_blob(size).result(60) == size
    holder = client.state_show("big")["nodes"]["Counter"]
    other = "dst" if holder == "src" else "src"
    out = client.migrate("big", holder, other)
    assert out["moved"] == ["Counter"] and out["bytes"] > size
    shown = client.state_show("big")
    assert shown["nodes"] == {"Counter": other}
    assert shown["units"]["Counter"]["objects"]["blob"]["$large"] > size  # summarised, not shipped
    assert c.blob().result(60) == {"len": size, "sum": size}  # the next call sees all of it
    assert {a.proc.pid, b.proc.pid} >= {c.where().result(30)}


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
    assert '"alpha"' in r.stdout and "n @v3 = 5" in r.stdout
    r = cli("log", "cli-s", "--json")
    log = json.loads(r.stdout)["units"]["Counter"]
    assert [(e["version"], e["m"], e["w"]) for e in log] == [(1, "note", ["notes"]), (2, "note", ["notes"]),
                                                            (3, "incr", ["n"])]
    holder = json.loads(cli("show", "cli-s", "--json").stdout)["nodes"]["Counter"]
    other = "c2" if holder == "c1" else "c1"
    r = subprocess.run([sys.executable, "-m", "nalar.cli.main", "state", "migrate", "cli-s", "--from", holder,
                        "--to", other, "--nats", nats_url, "--namespace", namespace],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"from {holder} to {other}" in r.stdout, r.stderr
    assert json.loads(cli("show", "cli-s", "--json").stdout)["nodes"]["Counter"] == other
    assert c.notes().result(30) == ["alpha", "beta"]
    r = cli("show", "no-such-session")
    assert r.returncode == 1 and "no node holds" in r.stdout


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


def test_garbage_in_a_state_transfer_fails_the_move_and_the_node_keeps_serving(start_node, client, nats_url,
                                                                               namespace):
    """A "holder" that answers an export with garbage: the move fails clearly and nothing is written."""
    import asyncio

    import nats

    start_node("sample_actors:Counter", name="dest")
    ready, stop = threading.Event(), threading.Event()

    async def fake_holder() -> None:
        nc = await nats.connect(nats_url)

        async def on(msg):
            body = orjson.loads(msg.data)
            if body.get("op") == "units":
                await msg.respond(orjson.dumps({"v": ["Counter"]}))
            elif body.get("op") == "export":
                for i, chunk in enumerate((b"NLS1garbage-", b"\x00\xff" * 100)):
                    await nc.publish(msg.reply, chunk, headers={"Nalar-Seq": str(i), "Nalar-Total": "2"})

        await nc.subscribe(f"nalar.{namespace}.node.fake", cb=on)
        await nc.flush()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    async def place_at_fake() -> None:  # as if "fake" held the unit
        from nalar.state.placement import KVPlacement

        nc = await nats.connect(nats_url)
        p = await KVPlacement.open(nc.jetstream(), namespace)
        assert await p.claim(K.unit("victim-session", "Counter"), "fake") == "fake"
        await nc.close()

    asyncio.run(place_at_fake())
    holder = threading.Thread(target=lambda: asyncio.run(fake_holder()), daemon=True)
    holder.start()
    assert ready.wait(30)
    try:
        with pytest.raises(nalar.RemoteError, match="bad state transfer"):
            client.migrate("victim-session", "fake", "dest")
    finally:
        stop.set()
        holder.join(30)
    assert client.stub("Counter").options(session="fine").incr().result(30) == 1  # still serving
    assert client.state_show("victim-session")["units"] == {}  # nothing was written


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


def test_concurrent_moves_of_one_unit_leave_one_lineage(start_node, client):
    import concurrent.futures

    for n in ("ha", "hb", "hc"):
        start_node("sample_actors:Counter", name=n)
    c = client.stub("Counter").options(session="one")
    assert c.incr().result(30) == 1
    holder = client.state_show("one")["nodes"]["Counter"]
    others = [n for n in ("ha", "hb", "hc") if n != holder]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        outcomes = list(ex.map(lambda dst: _try(lambda: client.migrate("one", holder, dst)), others))
    assert sum(1 for o in outcomes if not isinstance(o, Exception)) <= 1  # at most one move wins
    values = [c.incr().result(30) for _ in range(12)]
    assert values == list(range(2, 14))  # one lineage: no counter goes back


def _try(fn):
    try:
        return fn()
    except Exception as e:  # the losing move's error is the expected outcome
        return e


def test_a_forged_export_done_does_not_drop_the_holders_copy(start_node, client, nats_url, namespace):
    import asyncio

    import nats

    start_node("sample_actors:Counter", name="keeper")
    c = client.stub("Counter").options(session="kept")
    assert c.incr().result(30) == 1

    async def forge() -> None:
        nc = await nats.connect(nats_url)
        await nc.publish(f"nalar.{namespace}.node.keeper", orjson.dumps(
            {"op": "export_done", "session": "kept", "actor": "Counter", "ok": True}))
        await nc.flush()
        await nc.close()

    asyncio.run(forge())
    assert c.incr().result(30) == 2


def test_an_overlong_session_for_state_is_a_clear_error(start_node, client):
    start_node("sample_actors:Counter")
    with pytest.raises(nalar.RemoteError, match="session id for state"):
        client.stub("Counter").options(session="é" * 200).incr().result(30)
    assert client.stub("Counter").options(session="short").incr().result(30) == 1


def test_a_stateful_call_into_its_own_session_fails_fast(start_node, client):
    start_node("sample_actors:SelfCaller")
    with pytest.raises(nalar.RemoteError, match="would wait for itself"):
        client.stub("SelfCaller").options(session="me", timeout=60).outer().result(20)
