"""``nalar bench state``: durable state-changing calls, raw LMDB on the same disk, and migration.

1. Commits: one node process serves the stateful async actor ``StateBench``; this process keeps
   ``--inflight`` ``incr()`` calls in flight over ``--sessions`` sessions (each worker cycles through
   its own share of them, so no two workers wait on one session) for ``--seconds`` per round,
   ``--repeat`` rounds. Every call commits durably (LMDB sync on). Afterwards the sum of ``get()``
   over all sessions must equal the number of ``incr()`` calls that completed.
2. The reference, same run, same disk: raw ``lmdb`` puts of ~16-byte values, fsynced, batched in write
   transactions of the size the node's group committer reached, and one put per transaction.
3. Migration: two node processes; a session holding 1 MiB and one holding 10 MiB move back and forth
   ``--migrations`` times each (client-side time and the destination's own ``ms``); afterwards the
   session still holds all of it.

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


def state_node(url: str, ns: str, name: str, state_dir: str) -> Child:
    return Child([sys.executable, "-m", "nalar.cli.main", "node", SPEC, "--nats", url, "--namespace", ns,
                  "--name", name, "--state-dir", state_dir], " ready on ")


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


def raw_lmdb_round(path: str, batch: int, seconds: float, sessions: int) -> float:
    """Fsynced puts of ~16-byte values, ``batch`` per write transaction, for ``seconds``: puts/s."""
    import lmdb

    env = lmdb.open(path, map_size=1 << 30, sync=True, metasync=True)
    try:
        keys = [f"s{i:06d}/counter".encode() for i in range(sessions)]
        puts, k = 0, 0
        t = time.perf_counter()
        stop = t + seconds
        while time.perf_counter() < stop:
            with env.begin(write=True) as txn:
                for _ in range(batch):
                    txn.put(keys[k % sessions], b"%016d" % k)
                    k += 1
            puts += batch
        return puts / (time.perf_counter() - t)
    finally:
        env.close()


async def holder_of(client: Any, session: str) -> str:
    nodes = (await client.state_async(session, "show"))["nodes"]
    return str(nodes[ACTOR])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nalar

    base = tempfile.mkdtemp(prefix="nalar-bench-state-", dir=args.data_dir)
    server, url = server_for(args.nats)
    ns = "benchstate"
    tag = uuid.uuid4().hex[:8]  # fresh sessions even on a long-lived server's placement
    children: list[Child] = []
    client = None
    out: dict[str, Any] = {}
    try:
        client = await nalar.connect_async(url, ns)

        # -- 1. durable state-changing calls ------------------------------------------------------
        node = state_node(url, ns, f"state-{tag}", os.path.join(base, "node"))
        children.append(node)
        sessions = [f"c-{tag}-{i}" for i in range(args.sessions)]
        total_done = total_err = 0
        d, e, _ = await commit_round(client, sessions, args.inflight, 0.5)  # warm up: claims every session
        total_done, total_err = total_done + d, total_err + e
        st0 = (await client.status_async())[0]["state"]
        rates: list[float] = []
        for r in range(args.repeat):
            d, e, rate = await commit_round(client, sessions, args.inflight, args.seconds)
            total_done, total_err = total_done + d, total_err + e
            rates.append(rate)
            print(f"round {r + 1}/{args.repeat}: {rate:,.0f} commits/s" + (f" ({e} errors)" if e else ""),
                  file=sys.stderr)
        st1 = (await client.status_async())[0]["state"]
        ops, batches = st1["commit_ops"] - st0["commit_ops"], st1["commit_batches"] - st0["commit_batches"]
        batch = max(1, round(ops / max(1, batches)))
        sem = asyncio.Semaphore(args.inflight)

        async def get(s: str) -> int:
            async with sem:
                return int(await client.stub(ACTOR, timeout=60).options(session=s).get())

        counted = sum(await asyncio.gather(*(get(s) for s in sessions)))
        commits_ok = counted == total_done
        print(f"sum of get() over {len(sessions)} sessions: {counted:,}; incr() calls completed: {total_done:,}"
              f"{f' (+{total_err} failed)' if total_err else ''} -> {'ok' if commits_ok else 'MISMATCH'}",
              file=sys.stderr)
        node.stop()
        children.remove(node)

        # -- 2. raw LMDB on the same disk ------------------------------------------------------------
        raw_b: list[float] = []
        raw_1: list[float] = []
        for r in range(args.repeat):
            for b, acc in ((batch, raw_b), (1, raw_1)):
                path = os.path.join(base, f"raw-{b}-{r}")
                os.makedirs(path)
                acc.append(await asyncio.to_thread(raw_lmdb_round, path, b, args.seconds, args.sessions))
                shutil.rmtree(path, ignore_errors=True)
        print(f"raw lmdb: batch {batch} {median(raw_b):,.0f} puts/s, batch 1 {median(raw_1):,.0f} puts/s",
              file=sys.stderr)

        # -- 3. migration --------------------------------------------------------------------------
        names = [f"src-{tag}", f"dst-{tag}"]
        for n in names:
            children.append(state_node(url, ns, n, os.path.join(base, n)))
        mig: dict[int, dict[str, list[float]]] = {}
        migrate_ok = True
        for size in (MIB, 10 * MIB):
            session = f"m-{tag}-{size}"
            stub = client.stub(ACTOR, timeout=120).options(session=session)
            assert await stub.put(size) == size
            holder = await holder_of(client, session)
            client_ms: list[float] = []
            node_ms: list[float] = []
            for _ in range(args.migrations):
                other = names[1] if holder == names[0] else names[0]
                t = time.perf_counter()
                moved = await client.migrate_async(session, holder, other)
                client_ms.append((time.perf_counter() - t) * 1000)
                node_ms.append(float(moved["ms"]))
                holder = other
            now = await holder_of(client, session)
            got = int(await stub.size())
            ok = got == size and now == holder
            migrate_ok = migrate_ok and ok
            print(f"migrate {size // MIB} MiB: client {median(client_ms):.1f} ms, node {median(node_ms):.1f} ms; "
                  f"after {args.migrations} moves held by {now} (expected {holder}), size() = {got:,} "
                  f"-> {'ok' if ok else 'WRONG'}", file=sys.stderr)
            mig[size] = {"client": client_ms, "node": node_ms}
    finally:
        if client is not None:
            with contextlib.suppress(Exception):  # a broken connection must not keep the children running
                await client.aclose()
        for c in children:
            c.stop()
        if server:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)

    commits = median(rates)
    rb, r1 = median(raw_b), median(raw_1)
    m1, m10 = mig[MIB], mig[10 * MIB]
    print(f"\nnalar bench state: medians of {args.repeat} rounds of {args.seconds}s, {args.inflight} calls in flight "
          f"over {args.sessions} sessions, LMDB sync on; state under {args.data_dir or tempfile.gettempdir()}")
    print(f"{'path':<40} {'value':>12}  {'':<8} {'vs nalar':>9}")
    print(f"{'nalar commits/s (incr, durable)':<40} {commits:>12,.0f}  {'/s':<8} {1.0:>9.2f}")
    print(f"{f'raw LMDB puts/s batched (batch={batch})':<40} {rb:>12,.0f}  {'/s':<8} {rb / commits:>9.2f}")
    print(f"{'raw LMDB puts/s unbatched (batch=1)':<40} {r1:>12,.0f}  {'/s':<8} {r1 / commits:>9.2f}")
    for label, m in (("migrate 1 MiB", m1), ("migrate 10 MiB", m10)):
        print(f"{label + ' (client / node)':<40} {median(m['client']):>12.1f}  {'ms':<8} "
              f"{median(m['node']):>7.1f} ms")
    correct = commits_ok and migrate_ok
    print(f"{'correct (sum of counters, sizes)':<40} {correct!s:>12}")
    out.update({
        "commits_per_s": round(commits), "raw_puts_per_s": round(rb), "raw_puts_unbatched_per_s": round(r1),
        "ratio": round(commits / rb, 3) if rb else None, "batch": batch,
        "migrate_1mb_ms": round(median(m1["client"]), 2), "migrate_10mb_ms": round(median(m10["client"]), 2),
        "migrate_1mb_node_ms": round(median(m1["node"]), 2), "migrate_10mb_node_ms": round(median(m10["node"]), 2),
        "commits_counted": counted, "commits_done": total_done, "commit_errors": total_err,
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
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--migrations", type=int, default=5, help="moves per size, alternating direction")
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
