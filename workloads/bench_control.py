"""``nalar bench control``: the cost of control with many futures in flight.

Four node processes serve an async tool (``Waiter``, 256 calls at once per node) and a client
process sends ``N`` calls that wait, so N futures are in flight: about 1,000 running and the rest in
the nodes' priority queues. Then the policy actor (in this process, with the built-in policies
balance, head-of-line, srtf and lpt, and ``Churn`` below) runs full control rounds: metrics gathered from every node,
policies run, the batch persisted and broadcast, and every node's "applied" received. Reported per N:
the median round and its parts, and the local controller's time to schedule one call (admission to
bind or queue, measured inside each node). The reference measured in the same run is the bare round
trip of a control round's messages: a ping to all four nodes, gathered.

A bench policy (``Churn``) makes every round carry work for every node: each round it flips the
priority of the sessions first in line on every node (each node re-orders its queues) and migrates
eight of them per node to another node (their queued calls are handed over).

The last line is one JSON object (for the largest N when several are given).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import orjson

from ..policy.api import Policy
from .bench_util import Child, server_for

NODES = 4
SIZES = (1024, 8192, 32768, 131072)


class Churn(Policy):
    """A bench policy that changes something every round, so every round's batch has work for every
    node: it flips the priority of the sessions first in line and moves a few of them to another node."""

    name = "churn"

    def decide(self, view: Any, act: Any) -> None:
        for actor in view.actors.values():
            live = actor.live()
            for k, w in enumerate(actor.waiting):
                act.set_priority(w.session, None if view.round % 2 else 5)
                if k < 8 and len(live) > 1:
                    dst = next(i for i in live[k % len(live):] + live if i.node != w.node)
                    act.migrate(w.session, w.instance, dst.id)


async def _client(url: str, ns: str, n: int, hold: float) -> None:
    """The child that puts N calls in flight and keeps them there."""
    import nalar

    client = await nalar.connect_async(url, ns)
    waiter = client.stub("Waiter", timeout=hold + 120, retry=nalar.NO_RETRY)
    until = time.time() + hold
    futures = []
    for i in range(n):
        futures.append(waiter.options(session=f"s{i}").wait(until))
        if i % 2048 == 2047:
            await asyncio.sleep(0)
    await client.runtime.flush_out()
    print(f"submitted {n}", flush=True)
    await asyncio.Event().wait()


async def _one(url: str, ns: str, n: int, rounds: int, hold: float) -> dict[str, Any]:
    from ..actors.client import open_runtime
    from ..policy import PolicyActor, load_policies

    nodes = [Child([sys.executable, "-m", "nalar.cli.main", "node", "nalar.workloads.bench_actors:Waiter",
                    "--nats", url, "--namespace", ns, "--name", f"ctl{i}", "--max-queue", str(max(n, 1000))],
                   " ready on ") for i in range(NODES)]
    client = None
    rt = await open_runtime(url, ns, "bench-policy")
    try:
        actor = PolicyActor(rt, load_policies("balance,head-of-line,srtf,lpt") + [Churn()], collect_timeout=5.0)
        await actor.start()
        deadline = time.monotonic() + 30
        while len({k for k in rt.node_seen if k.startswith("ctl")}) < NODES:  # heartbeats: the nodes we expect
            if time.monotonic() > deadline:
                raise RuntimeError("the nodes did not send heartbeats")
            await asyncio.sleep(0.1)
        await actor.round()  # warm up: first batch (instances, weights)
        t0 = time.perf_counter()
        client = Child([sys.executable, "-m", "nalar.workloads.bench_control", "--client", url, ns, str(n), str(hold)],
                       f"submitted {n}", timeout=600)
        while True:  # every call in flight at the nodes
            m = await actor.collect()
            got = sum(int(x.get("in_flight", 0)) for x in m.values())
            if got >= n and len(m) == NODES:
                break
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"only {got} of {n} calls reached the nodes")
            await asyncio.sleep(0.2)
        submit_s = time.perf_counter() - t0
        sched = [m[k]["sched"] for k in m]
        sched_ns, sched_calls = sum(s[0] for s in sched), sum(s[1] for s in sched)
        queued = sum(a["queued"] for x in m.values() for a in x["actors"].values())
        stats = []
        for _ in range(rounds):
            stats.append(await actor.round())
            await asyncio.sleep(0.05)
        pings = []
        for _ in range(rounds):  # the reference: a bare scatter/gather over the same nodes
            p0 = time.perf_counter()
            await asyncio.gather(*(rt.request(rt.subjects.node(f"ctl{i}"), {"op": "ping"})
                                   for i in range(NODES)))
            pings.append((time.perf_counter() - p0) * 1000)
        await actor.stop()
    finally:
        if client is not None:
            client.proc.kill()
            client.proc.wait()
        for c in nodes:
            c.proc.kill()
            c.proc.wait()
        await rt.close()

    def med(key: str) -> float:
        return round(statistics.median(s[key] for s in stats), 3)

    return {"futures": n, "in_flight": stats[-1]["futures"], "queued": queued, "nodes": NODES,
            "round_ms": med("round_ms"), "round_ms_max": round(max(s["round_ms"] for s in stats), 3),
            "collect_ms": med("collect_ms"), "policy_ms": med("policy_ms"), "broadcast_ms": med("broadcast_ms"),
            "applied_by_all": all(s["applied_by"] == NODES for s in stats),
            "ops_per_round": statistics.median(s["ops"] for s in stats),
            "schedule_us": round(sched_ns / sched_calls / 1000, 3) if sched_calls else None,
            "scheduled_calls": sched_calls, "submit_s": round(submit_s, 2),
            "ping_all_ms": round(statistics.median(pings), 3),
            "round_vs_ping": round(med("round_ms") / statistics.median(pings), 2)}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    server, url = server_for(args.nats)
    out = []
    try:
        for i, n in enumerate(args.futures):
            out.append(await _one(url, f"benchctl{i}", n, args.rounds, args.hold))
    finally:
        if server:
            server.stop()
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--client":
        _, url, ns, n, hold = argv
        asyncio.run(_client(url, ns, int(n), float(hold)))
        return 0
    p = argparse.ArgumentParser(prog="nalar bench control")
    p.add_argument("--json", action="store_true", help="end with one JSON line (always printed last)")
    p.add_argument("--futures", default=",".join(map(str, SIZES)),
                   help="futures in flight: one number or a comma-separated list (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="control rounds measured per size (default: 15)")
    p.add_argument("--hold", type=float, default=600.0, help="seconds each call waits (it is torn down sooner)")
    p.add_argument("--nats", default=None, help="use this server instead of starting one")
    args = p.parse_args(argv)
    args.futures = [int(x) for x in str(args.futures).split(",") if x]
    if not args.futures or min(args.futures) < 1 or args.rounds < 1:
        p.error("--futures and --rounds must be positive")
    results = asyncio.run(run(args))
    print(f"\nnalar bench control: {NODES} node processes, an async tool that waits, policies balance, "
          "head-of-line, srtf, lpt, churn")
    print(f"{'futures':>8} {'queued':>8} {'round ms':>9} {'collect':>8} {'policy':>7} {'bcast':>7} {'max':>7} "
          f"{'ping ms':>8} {'ratio':>6} {'sched us':>9} {'applied':>8}")
    for r in results:
        print(f"{r['futures']:>8,} {r['queued']:>8,} {r['round_ms']:>9.2f} {r['collect_ms']:>8.2f} "
              f"{r['policy_ms']:>7.2f} {r['broadcast_ms']:>7.2f} {r['round_ms_max']:>7.1f} {r['ping_all_ms']:>8.2f} "
              f"{r['round_vs_ping']:>6.1f} {r['schedule_us']:>9.2f} {str(r['applied_by_all']):>8}")
    print("round: median of full control rounds (metrics from every node, policies, batch persisted and broadcast,\n"
          "applied by every node); ping: the same nodes answering a bare control request; sched: the local\n"
          "controller's time per call, admission to bind or queue, inside the nodes")
    last = dict(results[-1], runs=results if len(results) > 1 else None)
    print(orjson.dumps(last).decode())
    return 0 if all(r["applied_by_all"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
