"""``nalar bench calls``: nalar calls against raw nats-py request/reply, measured in the same run.

Both sides talk to one nats-server started here; the raw responders and the nalar node are separate
processes, the client is this process. Two raw references: one echoes the request's bytes, one decodes
a JSON call body and encodes the answer with orjson on both sides (what real code does: the fairer one). For each of ``--repeat`` rounds (interleaved, so noise hits
both alike): sequential round trips (latency p50) and ``--inflight`` concurrent callers (throughput).
Medians over rounds are reported; the last line is one JSON object.

``--via http`` adds the same calls through a ``nalar gateway`` process (``POST /v1/actors/Echo/echo``
on keep-alive connections): the gateway's overhead is its p50 less the direct client's, in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Awaitable, Callable

import orjson

from .bench_util import Child, median, node_process, pct, server_for

Call = Callable[[int], Awaitable[Any]]


async def sequential(call: Call, n: int) -> list[float]:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t)
    return lat


async def concurrent(call: Call, inflight: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            await call(i)
            i += 1
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - t)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    import nalar

    server, url = server_for(args.nats)
    ns = "bench"
    children = [
        Child([sys.executable, "-m", "nalar.workloads.bench_actors", url, "bench.raw"], "raw responder ready"),
        Child([sys.executable, "-m", "nalar.workloads.bench_actors", url, "bench.rawjson", "json"],
              "raw responder ready"),
        node_process(url, ns, "nalar.workloads.demo:Echo", "nalar.workloads.bench_actors:SyncEcho"),
    ]
    gateway = None
    if args.via == "http":
        from ..bus.cluster import free_ports
        from .bench_http import start_gateway

        gateway, base = start_gateway(url, ns, free_ports(1)[0])
        children.append(gateway)
    try:
        nc = await nats.connect(url)
        payload = b'"hello"'

        async def raw(i: int) -> Any:
            return (await nc.request("bench.raw", payload, timeout=30)).data

        async def raw_json(i: int) -> Any:  # encode the call, decode the answer, as a real client does
            body = orjson.dumps({"m": "echo", "a": ["hello"], "k": {}})
            return orjson.loads((await nc.request("bench.rawjson", body, timeout=30)).data)["v"]

        client = await nalar.connect_async(url, ns)
        echo = client.stub("Echo", timeout=60)
        sync_echo = client.stub("SyncEcho", timeout=60)

        async def nal(i: int) -> Any:
            return await echo.echo("hello")

        async def nal_sync(i: int) -> Any:
            return await sync_echo.echo("hello")

        kinds: dict[str, Call] = {"raw": raw, "json": raw_json, "nalar": nal, "nalar_sync": nal_sync}
        http = None
        if gateway is not None:
            from .bench_http import HttpClient

            http = HttpClient(base)
            body = orjson.dumps(["hello"])

            async def via_http(i: int) -> Any:
                assert http is not None
                return await http.post("/v1/actors/Echo/echo", body)

            kinds["http"] = via_http
        for call in kinds.values():  # warm up connections, code paths, caches
            await sequential(call, 200)
            await concurrent(call, args.inflight, 0.3)
        p50: dict[str, list[float]] = {k: [] for k in kinds}
        p99: dict[str, list[float]] = {k: [] for k in kinds}
        rps: dict[str, list[float]] = {k: [] for k in kinds}
        seq_rps: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.repeat):
            for k, call in kinds.items():
                lat = await sequential(call, args.calls)
                p50[k].append(pct(lat, 0.5) * 1e6)
                p99[k].append(pct(lat, 0.99) * 1e6)
                seq_rps[k].append(len(lat) / sum(lat))
                rps[k].append(await concurrent(call, args.inflight, args.seconds))
            print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{k} {rps[k][-1]:,.0f}/s" for k in kinds),
                  file=sys.stderr)
        if http is not None:
            await http.close()
        await client.aclose()
        await nc.close()
    finally:
        for c in children:
            c.stop()
        if server:
            server.stop()

    m = {k: {"p50_us": median(p50[k]), "p99_us": median(p99[k]), "seq_rps": median(seq_rps[k]),
             "rps": median(rps[k])} for k in kinds}
    print(f"\nnalar bench calls: medians of {args.repeat} rounds; {args.calls} sequential calls per round, "
          f"{args.inflight} in flight for {args.seconds}s per round")
    print(f"{'path':<38} {'p50 us':>9} {'p99 us':>9} {'seq/s':>9} {'rps@' + str(args.inflight):>10} {'vs raw':>7} "
          f"{'vs json':>8}")
    names = {"raw": "raw nats-py request/reply (byte echo)", "json": "raw nats-py + orjson decode/encode",
             "nalar": "nalar call (async actor)", "nalar_sync": "nalar call (sync pykka actor)",
             "http": "HTTP via nalar gateway (async actor)"}
    for k in kinds:
        print(f"{names[k]:<38} {m[k]['p50_us']:>9.0f} {m[k]['p99_us']:>9.0f} {m[k]['seq_rps']:>9,.0f} "
              f"{m[k]['rps']:>10,.0f} {m[k]['rps'] / m['raw']['rps']:>7.2f} {m[k]['rps'] / m['json']['rps']:>8.2f}")
    out: dict[str, Any] = {}
    if "http" in m:
        over = m["http"]["p50_us"] - m["nalar"]["p50_us"]
        print(f"gateway overhead per request at p50: {over:,.0f} us over the direct client "
              f"({m['http']['p50_us']:,.0f} against {m['nalar']['p50_us']:,.0f}); through one gateway process "
              f"{m['http']['rps']:,.0f} requests/s at {args.inflight} in flight")
        out = {"http_p50_us": round(m["http"]["p50_us"], 1), "http_p99_us": round(m["http"]["p99_us"], 1),
               "http_rps": round(m["http"]["rps"]), "gateway_overhead_p50_us": round(over, 1)}
    return {
        **out,
        "raw_rps": round(m["raw"]["rps"]), "nalar_rps": round(m["nalar"]["rps"]),
        "ratio": round(m["nalar"]["rps"] / m["raw"]["rps"], 3),
        "raw_p50_us": round(m["raw"]["p50_us"], 1), "nalar_p50_us": round(m["nalar"]["p50_us"], 1),
        "p50_ratio": round(m["nalar"]["p50_us"] / m["raw"]["p50_us"], 3),
        "sync_rps": round(m["nalar_sync"]["rps"]), "sync_p50_us": round(m["nalar_sync"]["p50_us"], 1),
        "sync_ratio": round(m["nalar_sync"]["rps"] / m["raw"]["rps"], 3),
        # the fairer reference: a responder that decodes and encodes JSON, as real code does
        "json_rps": round(m["json"]["rps"]), "json_p50_us": round(m["json"]["p50_us"], 1),
        "ratio_json": round(m["nalar"]["rps"] / m["json"]["rps"], 3),
        "p50_ratio_json": round(m["nalar"]["p50_us"] / m["json"]["p50_us"], 3),
        "sync_ratio_json": round(m["nalar_sync"]["rps"] / m["json"]["rps"], 3),
        "inflight": args.inflight, "repeat": args.repeat,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nalar bench calls")
    p.add_argument("--json", action="store_true", help="end with one JSON line (always printed last)")
    p.add_argument("--calls", type=int, default=2000, help="sequential calls per round")
    p.add_argument("--inflight", type=int, default=100)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each throughput round")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--nats", default=None, help="use this server instead of starting one")
    p.add_argument("--via", choices=("nats", "http"), default="nats",
                   help="http: also call through a nalar gateway process, and report its overhead")
    args = p.parse_args(argv)
    out = asyncio.run(run(args))
    print(orjson.dumps(out).decode())
    return 0
