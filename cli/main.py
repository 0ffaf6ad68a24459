"""The ``nalar`` command: up, node, policy, call, status, state, auth, nats, bench."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import orjson

from ..bus import envelope as env
from ..bus.errors import BusError, NalarError, RemoteError

EXIT_REMOTE, EXIT_USAGE, EXIT_CONNECT = 1, 2, 3


def _nats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", metavar="URL", default=None,
                   help="NATS URL(s), comma-separated (default: $NALAR_NATS_URL, else the local `nalar up`)")
    p.add_argument("--namespace", default=None, help="deployment namespace (default: $NALAR_NAMESPACE or 'default')")


def _replicas_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None, choices=[1, 2, 3, 4, 5],
                   help="JetStream replicas of the session-state stream and nalar's buckets (default: "
                        "$NALAR_REPLICAS, else 3 on a cluster of 3 or more servers, 1 on a single server)")


def _apply_replicas(a: argparse.Namespace) -> None:
    """``--replicas`` wins over ``NALAR_REPLICAS``; everything this process creates in JetStream reads it."""
    if getattr(a, "replicas", None) is not None:
        os.environ["NALAR_REPLICAS"] = str(a.replicas)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nalar", description="Serve multi-step LLM agent applications.")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start an embedded NATS server and a node serving the demo workload")
    up.add_argument("actors", nargs="*", metavar="module:Class[=N]", help="serve these instead of the demo")
    up.add_argument("--namespace", default=os.environ.get("NALAR_NAMESPACE", "default"))
    up.add_argument("--data-dir", default=None, help="JetStream data directory (default: a temporary one)")
    _policy_args(up)
    _replicas_arg(up)
    up.add_argument("--insecure", action="store_true",
                    help="run NATS without credentials: anyone who can reach it can do anything (tests only)")

    node = sub.add_parser("node", help="serve actor classes against a NATS server")
    node.add_argument("actors", nargs="*", metavar="module:Class[=N]", help="actor classes and instance counts")
    node.add_argument("--demo", action="store_true", help="serve the demo workload's actors")
    node.add_argument("--name", default=None, help="node name (default: HOST-PID)")
    node.add_argument("--state-dir", default=None,
                      help="LMDB directory for session state (default: $NALAR_HOME/state/NODE-NAME)")
    node.add_argument("--grace", type=float, default=10.0,
                      help="on SIGTERM, seconds running calls get to finish before they are cancelled (default: 10)")
    node.add_argument("--max-queue", type=int, default=None, metavar="N",
                      help="calls queued per actor before new ones fail with Overloaded (default: 100000)")
    _replicas_arg(node)
    _nats_args(node)

    pol = sub.add_parser("policy", help="run the policy actor: gather metrics, run policies, broadcast decisions")
    _policy_args(pol)
    pol.add_argument("--name", default=None,
                     help="this policy actor's name, as `nalar status` shows it (default: HOST-PID)")
    _nats_args(pol)

    call = sub.add_parser("call", help="call ACTOR.METHOD and print the result as JSON")
    call.add_argument("target", metavar="ACTOR.METHOD")
    call.add_argument("args", nargs="?", default="[]", metavar="JSON",
                      help="a JSON array is the argument list, an object the keyword arguments, "
                           "anything else the one argument (default: [])")
    call.add_argument("--session", default=None, help="session id")
    call.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default: 60)")
    _nats_args(call)

    st = sub.add_parser("status", help="nodes, actors, instances and in-flight calls")
    st.add_argument("--json", action="store_true", help="print the raw status of every node as JSON")
    st.add_argument("--timeout", type=float, default=2.0)
    _nats_args(st)

    state = sub.add_parser("state", help="session state: show, log, migrate")
    ssub = state.add_subparsers(dest="state_cmd", required=True)
    for name, text in (("show", "the latest objects of every actor's state in SESSION"),
                       ("log", "which future made which version of SESSION's state, and when")):
        sp = ssub.add_parser(name, help=text)
        sp.add_argument("session")
        sp.add_argument("--json", action="store_true")
        _nats_args(sp)
    mg = ssub.add_parser("migrate", help="move SESSION's state from one node to another")
    mg.add_argument("session")
    mg.add_argument("--from", dest="src", required=True, metavar="NODE")
    mg.add_argument("--to", dest="dst", required=True, metavar="NODE")
    _nats_args(mg)

    from . import auth as auth_cli, nats as nats_cli

    auth_cli.add_parser(sub)
    nats_cli.add_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks (see README)")
    bench.add_argument("what", choices=["calls", "futures", "state", "control", "analyst", "router", "swe"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default=None, metavar="LIST",
                   help="comma-separated built-in names (balance, head-of-line, reassign, srtf, lpt, affinity) "
                        "and module:Class user policies; 'none' for none (default: $NALAR_POLICIES, else "
                        "balance,head-of-line,affinity)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between control rounds (default: 1)")


def _err(msg: str) -> None:
    print(f"nalar: {msg}", file=sys.stderr)


def _parse_call_args(text: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"the arguments are not JSON ({e}); quote them, e.g. '[\"hello\"]'") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


async def _call(a: argparse.Namespace) -> int:
    from ..actors.client import connect_async

    actor, _, method = a.target.partition(".")
    if not actor or not method or method.startswith("_"):
        _err(f"{a.target!r}: expected ACTOR.METHOD, e.g. Analyst.analyze")
        return EXIT_USAGE
    try:
        args, kwargs = _parse_call_args(a.args)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    client = await connect_async(a.nats, a.namespace, name="nalar-cli")
    try:
        stub = client.stub(actor, timeout=a.timeout, session=a.session)
        result = await getattr(stub, method)(*args, **kwargs)
    except RemoteError as e:
        _err(str(e))
        return EXIT_REMOTE
    finally:
        await client.aclose()
    sys.stdout.write(env.dumps(result, None).decode() + "\n")
    return 0


def _print_status(nodes: list[dict[str, Any]], policy: dict[str, Any] | None = None) -> None:
    if policy is not None:
        d = policy["decisions"]
        last = policy.get("last_round") or {}
        print(f"policy actor  {', '.join(policy['policies']) or 'no policies'}  every {policy['interval_s']:g}s  "
              f"round {policy['rounds']}  last {last.get('round_ms', '-')} ms  errors {len(policy['errors'])}")
        role = policy.get("role", "single")
        standbys = ", ".join(policy.get("standbys") or []) or "none"
        if role == "leader":
            print(f"  leader {policy.get('name')} (term {policy.get('term')}), standbys: {standbys}")
        elif role == "standby":
            held = policy.get("leader")
            print(f"  no leader answered{f' (the lease names {held})' if held else ''}; standbys: {standbys}")
        else:
            print(f"  {policy.get('name', 'the policy actor')} decides alone (no JetStream: no election)"
                  + (f"; also answering: {standbys}" if policy.get("standbys") else ""))
        _print_decisions(d)
        for r in policy.get("refused", [])[-3:]:
            print(f"  refused: {r}")
    else:
        print("policy actor  not running (nodes keep the decisions they have)")
    if not nodes:
        print("no nodes answered")
        return
    for n in nodes:
        mal = sum(n.get("malformed", {}).values())
        print(f"node {n['node']}  pid {n['pid']}  up {n['uptime_s']:.0f}s  in-flight {n['in_flight']}  "
              f"malformed {mal}{'  tracing' if n.get('tracing') else ''}")
        st = n.get("state")
        if st:
            reps = st.get("replicas", 1)
            where = (f"stream {st['stream']}, {reps} replica{'s' if reps != 1 else ''}" if st.get("stream")
                     else "no JetStream: this node's LMDB is the only copy")
            print(f"  state: {st['units']} session units current here, {st['appends']} commits appended "
                  f"({st['conflicts']} lost a race and ran again), caught up {st['caught_up']} times; "
                  f"log: {where}; store {st['path']}")
        ctl = n.get("control") or {}
        if ctl:
            refused = ctl.get("refused") or {}
            if refused:
                print(f"  refused decisions (term {ctl.get('term', 0)}): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
                      + "".join(f"\n    {why}" for why in list((ctl.get("refusals") or {}).values())[-3:]))
            errs = ctl.get("errors") or {}
            print(f"  control: decisions v{ctl.get('applied_version', 0)}, migrated {ctl.get('migrated', 0)}, "
                  f"provisioned {ctl.get('provisioned', 0)}, killed {ctl.get('killed', 0)}, forwarded "
                  f"{n.get('counters', {}).get('forwarded', 0)}, schedule {ctl.get('schedule_us')} us/call"
                  + (f", errors: {'; '.join(f'{k}: {v}' for k, v in errs.items())}" if errs else ""))
        print(f"  {'ACTOR':<16} {'KIND':<6} {'INST':>4} {'RUNNING':>7} {'QUEUED':>6} {'DONE':>8} {'FAILED':>6}")
        for name, a in sorted(n["actors"].items()):
            print(f"  {name:<16} {a['kind']:<6} {len(a['instances']):>4} {a['running']:>7} {a['queued']:>6} "
                  f"{a['done']:>8} {a['failed']:>6}")
            for iid, st in sorted((a.get("engine") or {}).items()):
                if "error" in st:
                    print(f"    engine {iid}: stats failed: {st['error']}")
                    continue
                sim = f" (simulated: {st['simulated']})" if st.get("simulated") else ""
                print(f"    engine {iid}: running {st.get('running', 0)}, waiting {st.get('waiting', 0)}, "
                      f"KV {100 * float(st.get('kv_usage', 0)):.0f}%, prefix hits "
                      f"{100 * float(st.get('prefix_hit_rate', 0)):.0f}%{sim}")


def _print_decisions(d: dict[str, Any]) -> None:
    print(f"  decisions in force: v{d['version']}")
    for actor, w in sorted(d.get("weights", {}).items()):
        print(f"    route {actor}: " + ", ".join(f"{i} x{x:g}" for i, x in sorted(w.items())))
    for actor, insts in sorted(d.get("sticky", {}).items()):
        print(f"    sticky {actor}: sessions hashed onto {len(insts)} instances, others round-robin")
    for actor, insts in sorted(d.get("home", {}).items()):
        print(f"    home {actor}: new sessions hashed onto {len(insts)} instances (soft)")
    for kind in ("session_routes", "affinity_routes"):
        for actor, n in sorted(d.get(kind, {}).items()):
            print(f"    {kind.replace('_', ' ')} {actor}: {n} sessions")
    if d.get("priorities"):
        print(f"    priorities: {d['priorities']} sessions")
    for node, per in sorted(d.get("scale", {}).items()):
        print(f"    instances wanted on {node}: " + ", ".join(f"{a} x{c}" for a, c in sorted(per.items())))


async def _status(a: argparse.Namespace) -> int:
    from ..actors.client import connect_async

    client = await connect_async(a.nats, a.namespace, name="nalar-cli", role="operator")
    try:
        nodes = await client.status_async(a.timeout)
        policy = await client.policy_status_async(min(a.timeout, 1.0))
    finally:
        await client.aclose()
    if a.json:
        sys.stdout.write(orjson.dumps({"nodes": nodes, "policy": policy}, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_status(nodes, policy)
    return 0 if nodes else 1


async def _state(a: argparse.Namespace) -> int:
    from ..actors.client import connect_async

    client = await connect_async(a.nats, a.namespace, name="nalar-cli", role="operator")
    try:
        if a.state_cmd == "migrate":
            out = await client.migrate_async(a.session, a.src, a.dst)
            print(f"moved {', '.join(out['moved']) or 'nothing'} of session {a.session!r} from {out['from']} to "
                  f"{out['to']}: {out['bytes']:,} bytes in {out['ms']:.1f} ms")
            return 0
        got = await client.state_async(a.session, a.state_cmd)
    except RemoteError as e:
        _err(str(e))
        return EXIT_REMOTE
    finally:
        await client.aclose()
    if a.json:
        sys.stdout.write(orjson.dumps(got, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if got["units"] else 1
    if not got["units"]:
        print(f"no node holds state for session {a.session!r}")
        return 1
    for actor, value in sorted(got["units"].items()):
        node = got["nodes"][actor]
        if a.state_cmd == "show":
            print(f"{actor}  (node {node}, version {value['version']})")
            for name, obj in value["objects"].items():
                text = orjson.dumps(obj).decode()
                print(f"  {name} @v{value['versions'].get(name, '?')} = {text if len(text) < 200 else text[:197] + '...'}")
        else:
            print(f"{actor}  (node {node})")
            print(f"  {'VERSION':>7}  {'TIME (UTC)':<23}  {'FUTURE':<24} {'METHOD':<16} {'ATTEMPT':>7}  WROTE")
            for entry in value:
                t = entry["t"]
                ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"
                print(f"  {entry['version']:>7}  {ts:<23}  {entry['f']:<24} {entry['m']:<16} {entry.get('a', 0):>7}  "
                      f"{', '.join(entry['w'])}")
    return 0


def _node(a: argparse.Namespace) -> int:
    from .serve import serve_node

    specs = _specs(a.actors, a.demo)
    if not specs:
        _err("nothing to serve: give module:Class[=N] arguments or --demo")
        return EXIT_USAGE

    _apply_replicas(a)

    def ready(node: Any, url: str) -> None:
        served = ", ".join(f"{g.name} x{len(g.instances)}" for g in node.groups.values())
        print(f"nalar node {node.name} ready on {url} (namespace {node.rt.subjects.ns!r}): {served}", flush=True)

    if a.max_queue is not None and a.max_queue < 1:
        _err("--max-queue must be >= 1")
        return EXIT_USAGE
    asyncio.run(serve_node(specs, a.nats, a.namespace, a.name, ready, grace=a.grace, state_dir=a.state_dir,
                           max_queue=a.max_queue))
    return 0


def _specs(texts: list[str], demo: bool) -> list[tuple[type, int | None]]:
    from .specs import parse_spec

    specs = [parse_spec(t) for t in texts]
    if demo:
        from ..workloads.demo import DEMO

        specs = list(DEMO) + specs
    return specs


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "up":
            from .up import run_up

            from ..policy import load_policies

            _apply_replicas(a)
            return run_up(_specs(a.actors, not a.actors), a.namespace, a.data_dir, load_policies(a.policies),
                          a.interval, insecure=a.insecure)
        if a.cmd == "auth":
            from . import auth as auth_cli

            return auth_cli.run(a)
        if a.cmd == "nats":
            from . import nats as nats_cli

            return nats_cli.run(a)
        if a.cmd == "policy":
            from .policy import serve_policy

            if a.interval <= 0:
                _err("--interval must be > 0")
                return EXIT_USAGE
            asyncio.run(serve_policy(a.nats, a.namespace, a.policies, a.interval, name=a.name))
            return 0
        if a.cmd == "node":
            return _node(a)
        if a.cmd == "call":
            return asyncio.run(_call(a))
        if a.cmd == "status":
            return asyncio.run(_status(a))
        if a.cmd == "state":
            return asyncio.run(_state(a))
        if a.cmd == "bench":
            from ..workloads import bench

            return bench.main(a.what, a.rest)
    except BusError as e:
        _err(str(e))
        return EXIT_CONNECT
    except (NalarError, ValueError, TypeError) as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
