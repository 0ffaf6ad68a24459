"""``nalar bench WORKLOAD``: a reference workload under open-loop Poisson load, nalar against a baseline.

One run per (rate, configuration): fresh node processes serve the workload's actors (model instances
stand for GPUs, the same number in every configuration), a policy actor runs in this process, and
sessions arrive at ``--rps`` for ``--duration`` seconds whatever the latency (open loop); follow-up
turns of a session are sent after the previous answer plus the session's think time. Then arrivals
stop and the run drains: a turn not answered within the workload's deadline counts as failed.

Configurations (``--compare`` runs both, one after the other, at every rate):

* ``nalar``: the workload's policies (e.g. balance, head-of-line, affinity, srtf, lpt, proportional);
  calls are bound late, queues are ordered by priority, sessions and model slots move.
* ``baseline``: what the reference design's baselines do, expressed as the ``sticky`` policy alone:
  each session pinned to one instance of every actor by a hash of its id (its first GPU, forever:
  no migration), other calls round-robin, each bound on arrival to its instance's FIFO queue (first
  come, first served, no priorities) and handed to a model's engine with no KV budget (its own
  first-come queue and cache do the rest), and a static allocation of model instances.

Per configuration: p50/p95/p99/mean latency of a turn, throughput, failures, and the latency trend
(median of the last quarter of arrivals over the first quarter: about 1 when latency is bounded, far
above when a queue keeps growing). Results go to ``--out`` as JSON with PNG plots (latency CDF,
latency against arrival time, latency against rate for sweeps); the last line printed is one JSON
object. With the simulated engine every output says so.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .bench_util import Child, pct, server_for
from .spec import Session, WorkloadSpec

WORKLOADS = {"analyst": "nalar.workloads.analyst", "router": "nalar.workloads.router", "swe": "nalar.workloads.swe"}
CONFIGS = ("nalar", "baseline")


def load_workload(name: str) -> WorkloadSpec:
    try:
        mod = importlib.import_module(WORKLOADS[name])
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}") from None
    wl = getattr(mod, "WORKLOAD")
    assert isinstance(wl, WorkloadSpec)
    return wl


@dataclass
class TurnRecord:
    session: str
    turn: int
    arrival: float  # seconds since the run's start when it was sent
    latency_ms: float | None = None  # None: failed or unanswered
    error: str | None = None


@dataclass
class RunResult:
    config: str
    rps: float
    records: list[TurnRecord] = field(default_factory=list)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.latency_ms is not None]
        lat = [r.latency_ms for r in ok if r.latency_ms is not None]
        failed = len(self.records) - len(ok)
        seq = [float(r.latency_ms) for r in sorted(ok, key=lambda r: r.arrival) if r.latency_ms is not None]
        q = max(1, len(seq) // 4)
        first = statistics.median(seq[:q]) if seq else 0.0
        last = statistics.median(seq[-q:]) if seq else 0.0
        errors: dict[str, int] = {}
        for r in self.records:
            if r.error:
                errors[r.error] = errors.get(r.error, 0) + 1
        return {
            "p50_ms": round(pct(lat, 0.50), 1), "p95_ms": round(pct(lat, 0.95), 1),
            "p99_ms": round(pct(lat, 0.99), 1), "mean_ms": round(statistics.fmean(lat), 1) if lat else float("nan"),
            "throughput_rps": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
            "failed": failed, "completed": len(ok), "turns": len(self.records),
            "trend": round(last / first, 2) if first else None,
            "errors": errors, **self.extra,
        }


#: ``--engine vllm:tiny``: the locally made tiny Llama (dummy weights) on vLLM, as the CPU tests run it.
TINY_ARGS = {"load_format": "dummy", "enforce_eager": True, "max_model_len": 16384}


def _engine_env(engine: str, speed: float) -> dict[str, str]:
    env: dict[str, str] = {}
    if engine == "vllm:tiny":
        from ..actors.models.tiny import make_tiny_model
        from ..bus.discovery import home

        engine = "vllm:" + make_tiny_model(home() / "tiny-llama")
        env["NALAR_LLM_ARGS"] = os.environ.get("NALAR_LLM_ARGS") or orjson.dumps(TINY_ARGS).decode()
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    if engine != "sim":
        env["NALAR_LLM"] = engine
    if speed != 1.0:
        if not engine.startswith("sim"):
            raise ValueError("--speed applies to the simulated engine only")
        env["NALAR_LLM_ARGS"] = orjson.dumps({"speed": speed}).decode()
    return env


async def _run_turns(stub: Any, method: str, s: Session, t_start: float, out: list[TurnRecord],
                     timeout: float, done: Any) -> None:
    loop = asyncio.get_running_loop()
    for k, turn in enumerate(s.turns):
        if k and turn.think_s > 0:
            await asyncio.sleep(turn.think_s)
        t0 = loop.time()
        rec = TurnRecord(s.id, k, t0 - t_start)
        out.append(rec)
        try:
            await getattr(stub.options(session=s.id, timeout=timeout), method)(*turn.args)
            rec.latency_ms = (loop.time() - t0) * 1000
        except Exception as e:  # a failed turn ends its session: its follow-ups would have no context
            remote = getattr(e, "type", None)
            rec.error = f"{type(e).__name__}{f' ({remote})' if remote else ''}: {str(e)[:160]}"
            done(len(s.turns) - k)
            return
        done(1)


async def run_config(wl: WorkloadSpec, config: str, url: str, ns: str, rps: float, duration: float,
                     a: argparse.Namespace) -> RunResult:
    import nalar

    from ..policy import PolicyActor, load_policies

    specs = wl.nodes if config == "nalar" or wl.baseline_nodes is None else wl.baseline_nodes
    env = dict(wl.extra_env, **_engine_env(a.engine, a.speed))
    tmp = tempfile.mkdtemp(prefix=f"nalar-bench-{wl.name}-")
    names = [f"{wl.name}{k}" for k in range(len(specs))]
    nodes = [Child([sys.executable, "-m", "nalar.cli.main", "node", *node_specs, "--nats", url, "--namespace", ns,
                    "--name", names[k], "--state-dir", os.path.join(tmp, names[k]), "--max-queue", "1000000"],
                   " ready on ", env=env, timeout=300) for k, node_specs in enumerate(specs)]
    client = await nalar.connect_async(url, ns)
    policies = (tuple(a.policies.split(",")) if a.policies else wl.policies) if config == "nalar" else ("sticky",)
    actor = PolicyActor(client.runtime, load_policies(",".join(policies)), interval=a.interval, collect_timeout=2.0)
    stop = asyncio.Event()
    res = RunResult(config, rps)
    http: Any = None
    try:
        await actor.start()
        t_wait = time.monotonic()
        while not all(client.runtime.alive(n) for n in names):
            if time.monotonic() - t_wait > 60:
                raise RuntimeError("the bench nodes did not send heartbeats")
            await asyncio.sleep(0.05)
        await actor.round()  # the first decisions (instances, sticky bindings) are in force before load
        looping = asyncio.get_running_loop().create_task(actor.run(stop))
        sessions = list(wl.sessions(random.Random(a.seed), rps, duration))
        total = sum(len(s.turns) for _, s in sessions)
        actor_name, method = wl.entry.split(".", 1)
        stub: Any = client.stub(actor_name, retry=nalar.NO_RETRY)
        if a.via == "http":  # each session's turns through a gateway process, as an HTTP client's would
            from ..bus.cluster import free_ports
            from .bench_http import HttpClient, HttpStub, start_gateway

            gateway, base = start_gateway(url, ns, free_ports(1)[0])
            nodes.append(gateway)
            http = HttpClient(base)
            stub = HttpStub(http, actor_name)
        bar = _progress(total, f"{wl.name} {config} @ {rps:g} rps", a)

        def done(n: int) -> None:
            if bar is not None:
                bar.update(n)

        loop = asyncio.get_running_loop()
        t_start = loop.time()
        tasks = []
        for arrival, s in sessions:
            delay = t_start + arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(_run_turns(stub, method, s, t_start, res.records, wl.timeout_s, done)))
        await asyncio.gather(*tasks)
        res.wall_s = loop.time() - t_start
        if bar is not None:
            bar.close()
        stop.set()
        await looping
        res.extra = await _deployment_stats(actor, names)
    finally:
        stop.set()
        await actor.stop()
        if http is not None:
            await http.close()
        await client.aclose()
        for c in nodes:
            c.stop()
    return res


async def _deployment_stats(actor: Any, names: list[str]) -> dict[str, Any]:
    """What the policies did and what the model engines saw, from each node's status."""
    rt = actor.rt
    nodes = await asyncio.gather(*(rt.request(rt.subjects.node(n), {"op": "status"}, 10) for n in names))
    hit: list[float] = []
    moved = provisioned = killed = 0
    for node in nodes:
        for a in (node.get("actors") or {}).values():
            for st in (a.get("engine") or {}).values():
                if isinstance(st, dict) and "prefix_hit_rate" in st:
                    hit.append(float(st["prefix_hit_rate"]))
        c = node.get("control") or {}
        moved += int(c.get("migrated", 0))
        provisioned += int(c.get("provisioned", 0))
        killed += int(c.get("killed", 0))
    st = actor.status()
    return {"prefix_hit_rate": round(statistics.fmean(hit), 3) if hit else None, "migrated": moved,
            "provisioned": provisioned, "killed": killed, "policy_rounds": st.get("rounds"),
            "policy_errors": st.get("errors") or {}, "refused": len(st.get("refused") or [])}


def _progress(total: int, desc: str, a: argparse.Namespace) -> Any:
    if a.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="turn", file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=1.0)


def _engine_name(engine: str) -> str:
    if engine == "sim":
        return "simulated:llama3-8b-a100"
    return "simulated:" + engine.split(":", 1)[1] if engine.startswith("sim:") else engine


async def run(wl: WorkloadSpec, a: argparse.Namespace) -> list[dict[str, Any]]:
    server, url = server_for(a.nats)
    configs = CONFIGS if a.compare else (a.config,)
    rows: list[dict[str, Any]] = []
    raw: dict[tuple[float, str], RunResult] = {}
    try:
        for i, rps in enumerate(a.rates):
            row: dict[str, Any] = {"workload": wl.name, "rps": rps, "duration_s": a.duration,
                                   "engine": _engine_name(a.engine), "simulated": a.engine.startswith("sim"),
                                   "via": a.via}
            for config in configs:
                r = await run_config(wl, config, url, f"bench-{wl.name}-{config}-{i}-{os.getpid()}", rps,
                                     a.duration, a)
                raw[(rps, config)] = r
                row[config] = r.summary()
            if a.compare:
                n, b = row["nalar"], row["baseline"]
                row["nalar_vs_baseline"] = {
                    f"{k}_lower_pct": round(100 * (1 - n[k] / b[k]), 1) if b[k] else None
                    for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")}
                row["nalar_vs_baseline"]["speedup_mean"] = round(b["mean_ms"] / n["mean_ms"], 2) if n["mean_ms"] else None
            rows.append(row)
    finally:
        if server:
            server.stop()
    out = Path(a.out or f"bench-results/{wl.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_bytes(orjson.dumps({"rows": rows, "turns": {
        f"{c}@{r:g}": [[x.arrival, x.latency_ms, x.error] for x in res.records] for (r, c), res in raw.items()}},
        option=orjson.OPT_INDENT_2))
    from .bench_plots import plot

    for p in plot(wl.name, raw, rows, out):
        print(f"wrote {p}", file=sys.stderr)
    print(f"wrote {out / 'result.json'}", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]], configs: tuple[str, ...]) -> str:
    head = f"{'rps':>6} {'config':<9} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10} {'mean ms':>10} {'thr rps':>8} " \
           f"{'failed':>6} {'trend':>6}"
    lines = [head]
    for row in rows:
        for c in configs:
            s = row[c]
            lines.append(f"{row['rps']:>6g} {c:<9} {s['p50_ms']:>10.0f} {s['p95_ms']:>10.0f} {s['p99_ms']:>10.0f} "
                         f"{s['mean_ms']:>10.0f} {s['throughput_rps']:>8.2f} {s['failed']:>6} {s['trend']!s:>6}")
        if "nalar_vs_baseline" in row:
            r = row["nalar_vs_baseline"]
            lines.append(f"{'':>6} nalar vs baseline: p95 {r['p95_ms_lower_pct']}% lower, p99 "
                         f"{r['p99_ms_lower_pct']}% lower, mean {r['mean_ms_lower_pct']}% lower "
                         f"({r['speedup_mean']}x)")
    return "\n".join(lines)


def main(argv: list[str], name: str) -> int:
    wl = load_workload(name)
    p = argparse.ArgumentParser(prog=f"nalar bench {name}", description=wl.summary)
    p.add_argument("--rps", type=float, default=wl.default_rps, help=f"new sessions per second (default {wl.default_rps:g})")
    p.add_argument("--sweep", default=None, metavar="R1,R2,...", help="run each of these rates (overrides --rps)")
    p.add_argument("--duration", type=float, default=wl.default_duration, help="seconds of arrivals per run")
    p.add_argument("--compare", action="store_true", help="run nalar and the baseline configuration at every rate")
    p.add_argument("--config", choices=CONFIGS, default="nalar", help="the one configuration to run without --compare")
    p.add_argument("--engine", default="sim",
                   help="sim[:PROFILE] (default), vllm:MODEL, vllm:tiny (a tiny local model, dummy weights: runs "
                        "on a CPU), or openai:URL; options in $NALAR_LLM_ARGS (JSON)")
    p.add_argument("--speed", type=float, default=1.0, help="simulated engine only: divide its times by this")
    p.add_argument("--policies", default=None, metavar="LIST",
                   help="the nalar configuration's policies, comma-separated (built-in names or module:Class); "
                        "default: the workload's own")
    p.add_argument("--interval", type=float, default=0.25, help="policy round interval, seconds (default 0.25)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for result.json and plots (default bench-results/NAME-TIME)")
    p.add_argument("--json", action="store_true", help="print only JSON; the last line is the (last) result")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nats", default=None, help="use this NATS server (default: start an embedded one)")
    p.add_argument("--via", choices=("nats", "http"), default="nats",
                   help="http: every session's turns go through a nalar gateway process (POST /v1/actors/...)")
    a = p.parse_args(argv)
    if a.duration <= 0:
        p.error("--duration must be > 0")
    try:
        a.rates = [float(x) for x in a.sweep.split(",")] if a.sweep else [a.rps]
    except ValueError:
        p.error("--sweep takes comma-separated numbers, e.g. 20,40,80")
    if any(r <= 0 for r in a.rates):
        p.error("rates must be > 0")
    rows = asyncio.run(run(wl, a))
    configs = CONFIGS if a.compare else (a.config,)
    if a.json:
        for row in rows[:-1]:
            print(orjson.dumps(row).decode())
    else:
        if rows and rows[0]["simulated"]:
            print(f"(simulated engine: {rows[0]['engine']}; latencies come from its model, not a GPU)")
        print(_table(rows, configs))
    print(orjson.dumps(rows[-1]).decode())
    return 0
