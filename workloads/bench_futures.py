"""``nalar bench futures``: many calls pending at once, and what each pending future costs.

One client (this process) sends ``--count`` calls to an async tool in one node process; each parks
on an event until the benchmark releases it, so all are pending together. Reported: creation rate,
the time for all to complete after release, and RSS growth of client and node divided by the count.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

import orjson

from .bench_util import node_process, rss_bytes, server_for


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nalar

    server, url = server_for(args.nats)
    ns = "benchfut"
    node = node_process(url, ns, "nalar.workloads.demo:Echo")
    try:
        client = await nalar.connect_async(url, ns)
        echo = client.stub("Echo", timeout=args.timeout)
        # warm up: code paths, buffers, and one park/release cycle
        warm = [echo.wait(i) for i in range(1000)]
        await echo.release()
        await nalar.gather(warm)
        await echo.reset()

        async def node_in_flight() -> int:
            st = await client.status_async(2.0)
            return int(st[0]["in_flight"]) if st else -1

        gc.collect()
        client_before, node_before = rss_bytes(), rss_bytes(node.proc.pid)
        t0 = time.perf_counter()
        futures = []
        for i in range(args.count):
            futures.append(echo.wait(i))
            if i % 2048 == 2047:
                await asyncio.sleep(0)  # let the sender drain while we create
        created_s = time.perf_counter() - t0
        while (n := await node_in_flight()) < args.count:  # all parked at the node
            if time.perf_counter() - t0 > args.timeout:
                raise RuntimeError(f"only {n} of {args.count} calls reached the node")
            await asyncio.sleep(0.2)
        all_pending_s = time.perf_counter() - t0
        pending_now = sum(1 for f in futures if not f.available())
        client_peak, node_peak = rss_bytes(), rss_bytes(node.proc.pid)
        t1 = time.perf_counter()
        await echo.release()
        values = await nalar.gather(futures)
        complete_s = time.perf_counter() - t1
        ok = values == list(range(args.count))
        await client.aclose()
    finally:
        node.stop()
        if server:
            server.stop()
    c_per = (client_peak - client_before) / args.count
    n_per = (node_peak - node_before) / args.count
    print(f"\nnalar bench futures: {args.count:,} calls pending at once (client -> 1 node, async tool parked on an event)")
    print(f"{'created in':<34} {created_s:>10.2f} s   ({args.count / created_s:,.0f} futures/s)")
    print(f"{'all parked at the node after':<34} {all_pending_s:>10.2f} s")
    print(f"{'pending when measured':<34} {pending_now:>10,}")
    print(f"{'completed after release in':<34} {complete_s:>10.2f} s   ({args.count / complete_s:,.0f}/s)")
    print(f"{'all values correct':<34} {str(ok):>10}")
    print(f"{'client RSS growth per future':<34} {c_per:>10.0f} B")
    print(f"{'node RSS growth per future':<34} {n_per:>10.0f} B")
    print(f"{'total per future':<34} {c_per + n_per:>10.0f} B")
    return {"count": args.count, "completed": len(values) if ok else sum(1 for v in values if v is not None),
            "all_ok": ok, "create_per_s": round(args.count / created_s), "created_s": round(created_s, 3),
            "all_pending_s": round(all_pending_s, 3), "complete_s": round(complete_s, 3),
            "client_bytes_per_future": round(c_per), "node_bytes_per_future": round(n_per),
            "bytes_per_future": round(c_per + n_per)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nalar bench futures")
    p.add_argument("--json", action="store_true", help="end with one JSON line (always printed last)")
    p.add_argument("--count", type=int, default=131072)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each call, seconds")
    p.add_argument("--nats", default=None, help="use this server instead of starting one")
    args = p.parse_args(argv)
    out = asyncio.run(run(args))
    print(orjson.dumps(out).decode())
    return 0 if out["all_ok"] else 1
