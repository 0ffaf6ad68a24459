"""``nalar bench batch``: a batchable embedding-like tool against the same tool unbatched, same run.

One node process serves both (``workloads/embedder.py``); this process keeps ``--inflight`` calls in
flight to each in turn for ``--seconds``, ``--repeat`` rounds interleaved, and reports calls/s, latency
and the batch sizes the node formed. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from .bench_util import median, node_process, pct, server_for


async def _load(stub: Any, inflight: int, seconds: float) -> tuple[float, list[float]]:
    done = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await stub.embed(f"the quick brown fox {k} jumps over {i} lazy dogs")
            lat.append(time.perf_counter() - t)
            i += 1
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return done / (time.perf_counter() - t0), lat


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nalar

    server, url = server_for(args.nats)
    node = node_process(url, "bench-batch", "nalar.workloads.embedder:Embedder",
                        "nalar.workloads.embedder:EmbedderOne")
    try:
        client = await nalar.connect_async(url, "bench-batch")
        stubs = {"batched": client.stub("Embedder", timeout=120), "unbatched": client.stub("EmbedderOne", timeout=120)}
        a = await stubs["batched"].embed("a check")
        b = await stubs["unbatched"].embed("a check")
        assert a == b, (a, b)  # the same tool: the same answer
        rps: dict[str, list[float]] = {k: [] for k in stubs}
        p50: dict[str, list[float]] = {k: [] for k in stubs}
        p99: dict[str, list[float]] = {k: [] for k in stubs}
        for k, s in stubs.items():  # warm up
            await _load(s, args.inflight, 0.3)
        st0 = _batching(await client.status_async(2.0))
        for r in range(args.repeat):
            for k, s in stubs.items():
                got, lat = await _load(s, args.inflight, args.seconds)
                rps[k].append(got)
                p50[k].append(pct(lat, 0.5) * 1000)
                p99[k].append(pct(lat, 0.99) * 1000)
            print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{k} {rps[k][-1]:,.0f}/s" for k in stubs),
                  file=sys.stderr)
        st1 = _batching(await client.status_async(2.0))
        await client.aclose()
    finally:
        node.stop()
        if server:
            server.stop()
    batches, calls = st1[0] - st0[0], st1[1] - st0[1]
    mean_batch = calls / batches if batches else float("nan")
    m = {k: (median(rps[k]), median(p50[k]), median(p99[k])) for k in stubs}
    print(f"\nnalar bench batch: medians of {args.repeat} rounds of {args.seconds:g} s, {args.inflight} calls in flight")
    print(f"{'tool':<34} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'Embedder (batchable, <=64, 2 ms)':<34} {m['batched'][0]:>9,.0f} {m['batched'][1]:>8.2f} {m['batched'][2]:>8.2f}")
    print(f"{'EmbedderOne (the same, unbatched)':<34} {m['unbatched'][0]:>9,.0f} {m['unbatched'][1]:>8.2f} "
          f"{m['unbatched'][2]:>8.2f}")
    ratio = m["batched"][0] / m["unbatched"][0]
    print(f"batching: {ratio:.2f}x the calls/s, {mean_batch:.1f} calls per invocation on average")
    return {"batched_rps": round(m["batched"][0]), "unbatched_rps": round(m["unbatched"][0]),
            "ratio": round(ratio, 3), "mean_batch": round(mean_batch, 2),
            "batched_p50_ms": round(m["batched"][1], 3), "unbatched_p50_ms": round(m["unbatched"][1], 3),
            "inflight": args.inflight, "repeat": args.repeat}


def _batching(nodes: list[dict[str, Any]]) -> tuple[int, int]:
    b = [n.get("batching") or {} for n in nodes]
    return sum(x.get("batches", 0) for x in b), sum(x.get("batched_calls", 0) for x in b)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nalar bench batch", description=__doc__)
    p.add_argument("--json", action="store_true", help="end with one JSON line (always printed last)")
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each round")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--nats", default=None, help="use this server instead of starting one")
    args = p.parse_args(argv)
    out = asyncio.run(run(args))
    print(orjson.dumps(out).decode())
    return 0
