"""``nalar bench state``: durable state-changing calls through the log, against the references.

1. Commits: one node process serves the stateful async actor ``StateBench``; this process keeps
   ``--inflight`` ``incr()`` calls in flight over ``--sessions`` sessions (each worker cycles through
   its own share of them, so no two workers wait on one session) for ``--seconds`` per round,
   ``--repeat`` rounds. Every call is answered only once its commit is in the unit's JetStream log
   (file storage) and this node's LMDB copy. Afterwards the sum of ``get()`` over all sessions must
   equal the number of ``incr()`` calls that completed.
2. The references, same run, same server: raw fenced JetStream appends (nats-py requests with
   ``Nats-Expected-Last-Subject-Sequence`` and ``Nats-Msg-Id``, one subject per session, the same
   concurrency, a payload the size of a commit record); and the commit path before the log, a node
   with ``NALAR_STATE_LOG=lmdb-only`` (group commit to LMDB alone, fsynced; nothing replicated).
3. Deltas: 1,000 appends to one session's managed list; the bytes the 1,000th appended to the log
   beside the size of the list.
4. Catch-up: two node processes; a session holding 1 MiB and one holding 10 MiB are rewritten and then
   migrated to the node that did not write them, ``--migrations`` times each: the destination catches
   up from the log (client-side time and the destination's own ``ms``); afterwards the size is right.
5. With ``--cluster`` (the default), 1 and 2 again on a 3-server loopback cluster with 3 replicas.

The last line is one JSON object; the exit status is 1 if a correctness check failed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import orjson

from .bench_util import Child, median, server_for

ACTOR = "StateBench"
SPEC = "nalar.workloads.bench_actors:StateBench"
MIB = 1024 * 1024
RECORD_BYTES = 120  # about what one incr() commit appends (header line, value, reply)


def state_node(url: str, ns: str, name: str, state_dir: str, env: dict[str, str] | None = None) -> Child:
    return Child([sys.executable, "-m", "nalar.cli.main", "node", SPEC, "--nats", url, "--namespace", ns,
                  "--name", name, "--state-dir", state_dir], " ready on ", env=env)


async def commit_round(client: Any, sessions: list[str], inflight: int, seconds: float) -> tuple[int, int, float]:
    """``inflight`` workers, worker w cycling over sessions w, w+inflight, ...; returns (done, errors, rate)."""
    import nalar

    stubs = [client.stub(ACTOR, timeout=60).options(session=s) for s in sessions]
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done, errors
        mine = stubs[w::inflight]
        i = 0
        while time.perf_counter() < stop:
            try:
                await mine[i % len(mine)].incr()
                done += 1
            except nalar.NalarError as e:  # counted and reported; the sum check then tells whether it mattered
                errors += 1
                if errors <= 3:
                    print(f"incr failed: {type(e).__name__}: {e}", file=sys.stderr)
            i += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(min(inflight, len(stubs)))))
    return done, errors, done / (time.perf_counter() - t)


async def commits(client: Any, label: str, sessions: list[str], args: argparse.Namespace) -> tuple[list[float], bool, int]:
    """Warm up, ``--repeat`` rounds, then check the counters: (rates, correct, calls completed)."""
    total_done = total_err = 0
    d, e, _ = await commit_round(client, sessions, args.inflight, 0.5)  # warm up: every session's first commit
    total_done, total_err = total_done + d, total_err + e
    rates: list[float] = []
    for r in range(args.repeat):
        d, e, rate = await commit_round(client, sessions, args.inflight, args.seconds)
        total_done, total_err = total_done + d, total_err + e
        rates.append(rate)
        print(f"{label} round {r + 1}/{args.repeat}: {rate:,.0f} commits/s" + (f" ({e} errors)" if e else ""),
              file=sys.stderr)
    sem = asyncio.Semaphore(args.inflight)

    async def get(s: str) -> int:
        async with sem:
            return int(await client.stub(ACTOR, timeout=60).options(session=s).get())

    counted = sum(await asyncio.gather(*(get(s) for s in sessions)))
    ok = counted == total_done
    print(f"{label}: sum of get() over {len(sessions)} sessions {counted:,}; incr() calls completed {total_done:,}"
          f"{f' (+{total_err} failed)' if total_err else ''} -> {'ok' if ok else 'MISMATCH'}", file=sys.stderr)
    return rates, ok, total_done


async def raw_appends(url: str, stream: str, replicas: int, sessions: int, inflight: int, seconds: float,
                      repeat: int) -> list[float]:
    """Fenced JetStream appends straight from nats-py: one subject per session, ``inflight`` at once."""
    import nats
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig

    from ..state.log import DUPLICATE_WINDOW, MAX_PER_UNIT

    nc = await nats.connect(servers=url.split(","))
    js = nc.jetstream()
    subj = f"bench.{stream}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{subj}.>"], storage=StorageType.FILE,
                                     num_replicas=replicas, max_msgs_per_subject=MAX_PER_UNIT,
                                     discard=DiscardPolicy.OLD, duplicate_window=DUPLICATE_WINDOW))
    payload = b"x" * RECORD_BYTES
    last = [0] * sessions
    rates: list[float] = []
    try:
        for _ in range(repeat):
            n = 0
            stop = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                nonlocal n
                mine = list(range(w, sessions, inflight))
                i = 0
                while time.perf_counter() < stop:
                    s = mine[i % len(mine)]
                    msg = await nc.request(f"{subj}.s{s}", payload, timeout=10, headers={
                        "Nats-Expected-Last-Subject-Sequence": str(last[s]), "Nats-Msg-Id": f"{s}:{last[s]}"})
                    ack = orjson.loads(msg.data)
                    if "seq" not in ack:
                        raise RuntimeError(f"raw append refused: {ack}")
                    last[s] = ack["seq"]
                    n += 1
                    i += 1

            t = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(min(inflight, sessions))))
            rates.append(n / (time.perf_counter() - t))
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        await nc.close()
    return rates


async def appended_bytes(client: Any) -> int:
    return sum(int((st.get("state") or {}).get("appended_bytes", 0)) for st in await client.status_async())


async def delta_size(client: Any, session: str, n: int = 1000) -> tuple[int, int, float]:
    """(bytes the ``n``-th append to one list appended, the list's size then, mean bytes per append)."""
    stub = client.stub(ACTOR, timeout=60).options(session=session)
    b0 = await appended_bytes(client)
    for i in range(n - 1):
        await stub.append(f"token-{i:010d}")
    before = await appended_bytes(client)
    await stub.append(f"token-{n - 1:010d}")
    after = await appended_bytes(client)
    shown = await client.state_async(session, "show")
    size = len(orjson.dumps(shown["units"][ACTOR]["objects"]["items"]))
    return after - before, size, (after - b0) / n


async def writer_of(client: Any, session: str) -> str:
    """The node serving ``session`` (its home): asked without a state op, which would catch a node up."""
    pid = await client.stub(ACTOR, timeout=60).options(session=session).where()
    return next(str(st["node"]) for st in await client.status_async() if st["pid"] == pid)


async def catch_ups(client: Any, names: list[str], tag: str, migrations: int) -> tuple[dict[int, dict[str, list[float]]], bool]:
    mig: dict[int, dict[str, list[float]]] = {}
    ok_all = True
    for size in (MIB, 10 * MIB):
        session = f"m-{tag}-{size}"
        stub = client.stub(ACTOR, timeout=120).options(session=session)
        client_ms: list[float] = []
        node_ms: list[float] = []
        for i in range(migrations):
            assert await stub.put(size, "xyzw"[i % 4]) == size
            src = await writer_of(client, session)
            dst = names[1] if src == names[0] else names[0]
            t = time.perf_counter()
            moved = await client.migrate_async(session, src, dst)
            client_ms.append((time.perf_counter() - t) * 1000)
            node_ms.append(float(moved["ms"]))
            if moved["bytes"] < size:
                print(f"catch-up of {size // MIB} MiB on {dst} read only {moved['bytes']:,} bytes", file=sys.stderr)
                ok_all = False
        got = int(await stub.size())
        ok = got == size
        ok_all = ok_all and ok
        print(f"catch up {size // MIB} MiB: client {median(client_ms):.1f} ms, node {median(node_ms):.1f} ms; "
              f"size() = {got:,} -> {'ok' if ok else 'WRONG'}", file=sys.stderr)
        mig[size] = {"client": client_ms, "node": node_ms}
    return mig, ok_all


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nalar

    base = tempfile.mkdtemp(prefix="nalar-bench-state-", dir=args.data_dir)
    server, url = server_for(args.nats)
    tag = uuid.uuid4().hex[:8]  # fresh sessions and streams even on a long-lived server
    ns = f"benchstate{tag}"
    children: list[Child] = []
    clients: list[Any] = []
    cluster: Any = None
    out: dict[str, Any] = {}
    try:
        client = await nalar.connect_async(url, ns)
        clients.append(client)
        sessions = [f"c-{tag}-{i}" for i in range(args.sessions)]

        # -- 1. durable state-changing calls through the log ----------------------------------------
        node = state_node(url, ns, f"state-{tag}", os.path.join(base, "node"))
        children.append(node)
        rates, commits_ok, _ = await commits(client, "log", sessions, args)
        bytes_1000, list_bytes, mean_bytes = await delta_size(client, f"d-{tag}")
        print(f"deltas: the 1,000th append to one list appended {bytes_1000:,} bytes (the list is {list_bytes:,} "
              f"bytes; {mean_bytes:,.0f} bytes per append on average, snapshots included)", file=sys.stderr)
        st = (await client.status_async())[0]["state"]
        replicas1 = int(st.get("replicas", 1))
        node.stop()
        children.remove(node)

        # -- 2. references: raw fenced JetStream appends; the LMDB-only commit path -------------------
        raw = await raw_appends(url, f"raw{tag}", 1, args.sessions, args.inflight, args.seconds, args.repeat)
        print(f"raw fenced JetStream appends: {median(raw):,.0f}/s", file=sys.stderr)
        ns_old = f"benchold{tag}"
        old_client = await nalar.connect_async(url, ns_old)
        clients.append(old_client)
        old = state_node(url, ns_old, f"old-{tag}", os.path.join(base, "old"), env={"NALAR_STATE_LOG": "lmdb-only"})
        children.append(old)
        old_rates, old_ok, _ = await commits(old_client, "lmdb-only", sessions, args)
        old.stop()
        children.remove(old)

        # -- 4. catch-up of 1 MiB and 10 MiB sessions ----------------------------------------------------
        names = [f"src-{tag}", f"dst-{tag}"]
        for n in names:
            children.append(state_node(url, ns, n, os.path.join(base, n)))
        # until every process has heard both nodes' heartbeats, a session's home is not settled
        t_hb = time.monotonic()
        while len(client.runtime.serving(ACTOR)) < 2 and time.monotonic() - t_hb < 10:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # one more heartbeat: the nodes have heard each other too
        mig, migrate_ok = await catch_ups(client, names, tag, args.migrations)
        for c in children:
            c.stop()
        children.clear()

        # -- 5. the same on a 3-server cluster with 3 replicas ------------------------------------------
        c_rates: list[float] = []
        c_raw: list[float] = []
        cluster_ok = True
        if args.cluster:
            from ..bus.cluster import NatsCluster

            cluster = NatsCluster(os.path.join(base, "cluster"))
            await cluster.start_async()
            curl = cluster.url
            ns_c = f"benchcluster{tag}"
            cclient = await nalar.connect_async(curl, ns_c)
            clients.append(cclient)
            cnode = state_node(curl, ns_c, f"cl-{tag}", os.path.join(base, "cl"), env={"NALAR_REPLICAS": "3"})
            children.append(cnode)
            c_rates, cluster_ok, _ = await commits(cclient, "cluster R3", sessions, args)
            cnode.stop()
            children.remove(cnode)
            c_raw = await raw_appends(curl, f"rawc{tag}", 3, args.sessions, args.inflight, args.seconds, args.repeat)
            print(f"cluster R3 raw fenced JetStream appends: {median(c_raw):,.0f}/s", file=sys.stderr)
    finally:
        for cl in clients:
            with contextlib.suppress(Exception):  # a broken connection must not keep the children running
                await cl.aclose()
        for c in children:
            c.stop()
        if cluster is not None:
            cluster.stop()
        if server:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)

    com, rj, od = median(rates), median(raw), median(old_rates)
    m1, m10 = mig[MIB], mig[10 * MIB]
    print(f"\nnalar bench state: medians of {args.repeat} rounds of {args.seconds}s, {args.inflight} calls in flight "
          f"over {args.sessions} sessions; JetStream file storage, LMDB copies fsynced; under "
          f"{args.data_dir or tempfile.gettempdir()}")
    print(f"{'path':<52} {'value':>12}  {'':<6} {'vs nalar':>9}")
    rows = [("nalar commits/s (incr; in the log, 1 server)", com, "/s", com),
            ("raw fenced JetStream appends/s (1 server)", rj, "/s", rj),
            ("commit path before the log (LMDB only)", od, "/s", od)]
    if args.cluster:
        rows += [("nalar commits/s (3-server cluster, 3 replicas)", median(c_rates), "/s", median(c_rates)),
                 ("raw fenced JetStream appends/s (cluster, R3)", median(c_raw), "/s", median(c_raw))]
    for label, v, unit, r in rows:
        print(f"{label:<52} {v:>12,.0f}  {unit:<6} {r / com if com else float('nan'):>9.2f}")
    print(f"{'bytes appended by the 1,000th append to a list':<52} {bytes_1000:>12,}  {'B':<6} "
          f"(list {list_bytes:,} B)")
    for label, m in (("catch up 1 MiB (client / node)", m1), ("catch up 10 MiB (client / node)", m10)):
        print(f"{label:<52} {median(m['client']):>12.1f}  {'ms':<6} {median(m['node']):>7.1f} ms")
    correct = commits_ok and old_ok and migrate_ok and cluster_ok
    print(f"{'correct (sums of counters, sizes)':<52} {correct!s:>12}")
    out.update({
        "commits_per_s": round(com), "raw_puts_per_s": round(rj), "ratio": round(com / rj, 3) if rj else None,
        "lmdb_only_commits_per_s": round(od), "replicas": replicas1,
        "cluster_commits_per_s": round(median(c_rates)) if c_rates else None,
        "cluster_raw_puts_per_s": round(median(c_raw)) if c_raw else None,
        "bytes_per_append_1000th": bytes_1000, "list_bytes_1000": list_bytes, "mean_bytes_per_append": round(mean_bytes),
        "migrate_1mb_ms": round(median(m1["client"]), 2), "migrate_10mb_ms": round(median(m10["client"]), 2),
        "migrate_1mb_node_ms": round(median(m1["node"]), 2), "migrate_10mb_node_ms": round(median(m10["node"]), 2),
        "sessions": args.sessions, "inflight": args.inflight, "seconds": args.seconds, "repeat": args.repeat,
        "migrations": args.migrations, "correct": correct,
    })
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nalar bench state")
    p.add_argument("--json", action="store_true", help="end with one JSON line (always printed last)")
    p.add_argument("--inflight", type=int, default=256, help="incr() calls in flight")
    p.add_argument("--sessions", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each round")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--migrations", type=int, default=5, help="catch-ups per size, alternating nodes")
    p.add_argument("--no-cluster", dest="cluster", action="store_false",
                   help="skip the 3-server loopback cluster rounds")
    p.add_argument("--data-dir", default=None, help="put the state stores under this directory (the disk matters)")
    p.add_argument("--nats", default=None, help="use this server instead of starting one")
    args = p.parse_args(argv)
    if args.inflight < 1 or args.sessions < 1 or args.repeat < 1 or args.migrations < 1:
        p.error("--inflight, --sessions, --repeat and --migrations must be >= 1")
    try:
        out = asyncio.run(run(args))
    except Exception as e:  # the last line is JSON even when the run breaks
        import traceback

        traceback.print_exc()
        print(orjson.dumps({"error": f"{type(e).__name__}: {e}", "correct": False}).decode())
        return 1
    print(orjson.dumps(out).decode())
    return 0 if out["correct"] else 1
