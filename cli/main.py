"""The ``nalar`` command: the parser of every subcommand, and what runs each.

Conventions (``cli/args.py``): global flags before or after the subcommand, options between
positionals, help for a missing subcommand; expected errors are one ``nalar: ...`` line on stderr and
an exit status from ``cli/exits.py`` (listed in ``nalar --help``), never a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
import time
from typing import Any, cast

import orjson

from ..bus.errors import BusError, NalarError, RemoteError
from ..bus.server import DEFAULT_MAX_PAYLOAD
from . import exits, logs
from . import metrics as metrics_cli
from .args import GLOBALS, Parser, add_globals, byte_size, finish, port, port_or_zero, settle
from .connect import cli_client

RAW = argparse.RawDescriptionHelpFormatter
MAX_PAYLOAD_RANGE = (4 << 10, 64 << 20)  # nats-server refuses more than 64 MiB; nalar's own messages need room

BENCHMARKS = {
    "calls": "nalar calls against raw nats-py request/reply in the same run: latency and throughput",
    "futures": "many calls pending at once (131,072 by default) and the memory each pending future costs",
    "state": "durable state-changing calls through the JetStream log, against raw appends and the LMDB-only "
             "path; catch-up of 1 and 10 MiB sessions",
    "control": "the cost of a control round (metrics, policies, broadcast, apply) with up to 131,072 futures "
               "in flight",
    "batch": "a batchable embedding-like tool against the same tool unbatched, in the same run",
    "analyst": "reference workload: financial analyst, stateful follow-up sessions, under open-loop Poisson "
               "load (nalar against a baseline with --compare)",
    "router": "reference workload: a classifier in front of two imbalanced branches, under open-loop load",
    "swe": "reference workload: a software company, recursive, with failures and re-entry, under open-loop load",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("nalar")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from .. import __version__

        return __version__


def _nats_args(p: argparse.ArgumentParser) -> None:
    """``--nats`` and ``--namespace`` of a command that connects: the same words as the global flags'."""
    p.add_argument("--nats", metavar="URL", default=None, help=GLOBALS["nats"][1])
    p.add_argument("--namespace", metavar="NS", default=None, help=GLOBALS["namespace"][1])


def _replicas_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None, choices=[1, 2, 3, 4, 5],
                   help="JetStream replicas of the session-state stream and nalar's buckets (default: "
                        "$NALAR_REPLICAS, else 3 on a cluster of 3 or more servers, 1 on a single server)")


def _resources_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resources", type=_resources, default=None, metavar="SPEC",
                   help="what this node has for the actors' resources hints, e.g. gpu=4,cpu=8,memory=64GiB "
                        "(default: $NALAR_RESOURCES; a name left out is read from the machine: CPUs, memory, "
                        "GPUs that nvidia-smi lists; any other is 0)")


def _resources(text: str) -> dict[str, float]:
    from ..actors.resources import parse_resources

    try:
        return parse_resources(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _declared(a: argparse.Namespace) -> dict[str, float] | None:
    """``--resources``, else ``$NALAR_RESOURCES`` (a malformed one is a usage error), else ``None``."""
    if a.resources is not None:
        return dict(a.resources)
    from ..actors.node.resources import from_env

    return from_env()


def _apply_replicas(a: argparse.Namespace) -> None:
    """``--replicas`` wins over ``NALAR_REPLICAS``; everything this process creates in JetStream reads it."""
    if getattr(a, "replicas", None) is not None:
        os.environ["NALAR_REPLICAS"] = str(a.replicas)


def _max_payload(text: str) -> int:
    n = byte_size(text)
    lo, hi = MAX_PAYLOAD_RANGE
    if not lo <= n <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: max_payload must be between {lo >> 10} KiB and {hi >> 20} MiB")
    return n


def _policies_epilog() -> str:
    """Every built-in policy with the first clause of its docstring: the list can never fall behind."""
    from ..policy.builtin import BUILTIN

    lines = ["built-in policies:"]
    for name, cls in BUILTIN.items():
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        cut = min((i for i in (doc.find(": "), doc.find(". ")) if i > 0), default=len(doc))
        lines.append(f"  {name:<14}{doc[:cut].rstrip('.')}")
    return "\n".join(lines)


def _policy_args(p: argparse.ArgumentParser) -> None:
    from ..policy.builtin import BUILTIN, DEFAULT

    p.add_argument("--policies", default=None, metavar="LIST",
                   help=f"comma-separated built-in names ({', '.join(BUILTIN)}: listed below) and module:Class "
                        f"user policies; 'none' for none (default: $NALAR_POLICIES, else {','.join(DEFAULT)})")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between control rounds (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nalar", description="Serve multi-step LLM agent applications: actors, futures over NATS,\n"
                                         "two-level control, versioned session state.",
               epilog=exits.EPILOG + "\n\n`nalar COMMAND --help` describes each command.", formatter_class=RAW)
    p.add_argument("--version", action="version", version=f"nalar {version()}", help="print nalar's version and exit")
    add_globals(p)
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands"))
    policies = _policies_epilog()

    up = sub.add_parser("up", help="start an embedded NATS server, a node serving the demo (or given actors) and "
                                   "the policy actor", epilog=policies, formatter_class=RAW,
                        description="A development deployment in one command: nats-server (JetStream, credentials\n"
                                    "required unless --insecure), a node and the policy actor. Ctrl-C stops them all.")
    up.add_argument("actors", nargs="*", metavar="module:Class[=N]",
                    help="serve these (N instances each) instead of the demo workload")
    up.add_argument("--namespace", default=os.environ.get("NALAR_NAMESPACE", "default"),
                    help="deployment namespace (default: $NALAR_NAMESPACE, else 'default')")
    up.add_argument("--host", default="127.0.0.1",
                    help="the address NATS listens on (default: 127.0.0.1, this machine only; 0.0.0.0 lets "
                         "nodes on other hosts join)")
    up.add_argument("--port", type=port, default=None,
                    help="NATS's port (default: the last run's, else 4222 if free, else any free port)")
    up.add_argument("--name", default=None,
                    help="this node's name (default: a stable one, remembered in the data directory)")
    up.add_argument("--data-dir", default=None, metavar="DIR",
                    help="where nalar up keeps JetStream, session state and its node name (default: $NALAR_HOME/up)")
    up.add_argument("--max-payload", type=_max_payload, default=DEFAULT_MAX_PAYLOAD, metavar="BYTES",
                    help=f"NATS message size limit, e.g. 16777216 or 16MiB (default: {DEFAULT_MAX_PAYLOAD >> 20} "
                         f"MiB; at most {MAX_PAYLOAD_RANGE[1] >> 20} MiB): no call or reply can be larger")
    up.add_argument("--fresh", action="store_true",
                    help="start over, on purpose: a new data directory, every session's state dropped")
    _policy_args(up)
    _replicas_arg(up)
    _resources_arg(up)
    up.add_argument("--insecure", action="store_true",
                    help="run NATS without credentials: anyone who can reach it can do anything (tests only)")
    up.add_argument("--gateway-port", type=port_or_zero, default=os.environ.get("NALAR_GATEWAY_PORT", "8000"),
                    metavar="PORT", help="the HTTP gateway's port (`nalar gateway`: any actor's methods and an "
                                         "OpenAI-compatible API; default: $NALAR_GATEWAY_PORT, else 8000; 0: none)")
    up.add_argument("--gateway-host", default="127.0.0.1",
                    help="the address the gateway listens on (default: 127.0.0.1; it has no API key here: "
                         "run `nalar gateway --api-key` yourself to open it wider)")
    metrics_cli.add_up_arg(up)
    logs.add_args(up)

    node = sub.add_parser("node", help="serve actor classes against a NATS server",
                          description="Serve actor classes until SIGINT/SIGTERM; exits non-zero if the connection "
                                      "is lost for good, so a supervisor restarts it.")
    node.add_argument("actors", nargs="*", metavar="module:Class[=N]",
                      help="actor classes and instance counts (=0 hosts a class for the policy to provision)")
    node.add_argument("--demo", action="store_true", help="serve the demo workload's actors")
    node.add_argument("--name", default=None, help="node name (default: HOST-PID)")
    node.add_argument("--state-dir", default=None, metavar="DIR",
                      help="LMDB directory for session state (default: $NALAR_HOME/state/NODE-NAME)")
    node.add_argument("--grace", type=float, default=10.0, metavar="S",
                      help="on SIGTERM, seconds running calls get to finish before they are cancelled (default: 10)")
    node.add_argument("--max-queue", type=int, default=None, metavar="N",
                      help="calls queued per actor before new ones fail with Overloaded (default: 100000)")
    _replicas_arg(node)
    _resources_arg(node)
    metrics_cli.add_args(node, "this node")
    _nats_args(node)
    logs.add_args(node)

    pol = sub.add_parser("policy", help="run the policy actor: gather metrics, run policies, broadcast decisions",
                         epilog=policies, formatter_class=RAW,
                         description="The policy actor; several elect one leader, the others stand by.")
    _policy_args(pol)
    pol.add_argument("--name", default=None,
                     help="this policy actor's name, as `nalar status` shows it (default: HOST-PID)")
    metrics_cli.add_args(pol, "the policy actor")
    _nats_args(pol)
    logs.add_args(pol)

    from .call import ARGS_HELP

    call = sub.add_parser("call", help="call ACTOR.METHOD and print the result as JSON", formatter_class=RAW,
                          description="Call ACTOR.METHOD and print its result as JSON on stdout.",
                          epilog="examples:\n"
                                 "  nalar call Analyst.analyze '[\"the quick brown fox\"]'\n"
                                 "  nalar call Stats.count '{\"text\": \"a b c\"}' --session s1 --priority 5\n"
                                 "  nalar call Echo.echo @big.json          # the arguments from a file\n"
                                 "  jq -c . args.json | nalar call Echo.echo -   # from stdin")
    call.add_argument("target", metavar="ACTOR.METHOD", help="the actor and its public method, e.g. Analyst.analyze")
    call.add_argument("args", nargs="?", default="[]", metavar="JSON|@FILE|-", help=ARGS_HELP)
    call.add_argument("--session", default=None, help="session id: the call runs in that session, with its state")
    call.add_argument("--priority", type=int, default=None, metavar="N",
                      help="queue priority, higher first where calls wait; the calls it makes inherit it (default: 0)")
    call.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="the call's deadline in seconds, connecting included (default: $NALAR_DEFAULT_TIMEOUT, "
                           "else 300, as for the API)")
    _nats_args(call)

    st = sub.add_parser("status", help="the policy actor, the decisions in force, nodes, actors, instances and "
                                       "in-flight calls")
    st.add_argument("--json", action="store_true", help="print the raw status of every node as JSON")
    st.add_argument("--timeout", type=float, default=2.0, metavar="S",
                    help="seconds to wait for the nodes' answers, connecting included (default: 2)")
    _nats_args(st)
    from . import top as top_cli

    top_cli.add_parser(sub)

    state = sub.add_parser("state", help="session state: show, log, migrate")
    ssub = state.add_subparsers(dest="state_cmd", metavar="SUBCOMMAND", title="subcommands")
    for name, text in (("show", "the latest objects of every actor's state in SESSION"),
                       ("log", "which future made which version of SESSION's state, and when")):
        sp = ssub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sp.add_argument("session", help="the session id")
        sp.add_argument("--json", action="store_true", help="print it as JSON")
        sp.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the answer, connecting included (default: 30)")
        _nats_args(sp)
    mg = ssub.add_parser("migrate", help="warm node B with SESSION's state (for locality: any node can serve it)",
                         description="Have node B catch every unit of SESSION up with its log, so its calls "
                                     "find the state local there.")
    mg.add_argument("session", help="the session id")
    mg.add_argument("--from", dest="src", required=True, metavar="A", help="the node that holds it now")
    mg.add_argument("--to", dest="dst", required=True, metavar="B", help="the node to move it to")
    mg.add_argument("--timeout", type=float, default=300.0, metavar="S",
                    help="seconds to wait for the move, connecting included (default: 300)")
    _nats_args(mg)

    from . import auth as auth_cli, completion, nats as nats_cli

    auth_cli.add_parser(sub)
    nats_cli.add_parser(sub)
    from . import gateway_cmd

    gateway_cmd.add_parser(sub)

    listing = "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:<9} ", subsequent_indent=" " * 12)
                        for name, text in BENCHMARKS.items())
    bench = sub.add_parser("bench", help="benchmarks and reference workloads (the README's Benchmarks)",
                           formatter_class=RAW, description="Run a benchmark; its last line is one JSON object.",
                           epilog=f"benchmarks:\n{listing}\n\n`nalar bench BENCHMARK --help` lists its options.")
    bench.add_argument("what", choices=list(BENCHMARKS), metavar="BENCHMARK", help="which one (listed below)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="the benchmark's own options")

    completion.add_parser(sub)
    finish(p)
    return p


def _err(msg: object) -> None:
    print(f"nalar: {msg}", file=sys.stderr)


def _left(a: argparse.Namespace, started: float) -> float:
    """What is left of ``--timeout`` after connecting (never zero: the request then fails at once)."""
    return max(a.timeout - (time.monotonic() - started), 0.001)


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
        res = n.get("resources")
        if res:
            from ..actors.resources import describe

            print(f"  resources: {describe(res.get('total') or {}, res.get('used') or {})}")
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
    for actor, o in sorted(d.get("order", {}).items()):
        print(f"    order {actor}: least-served program first (x{o['weight']:g} its service, at most "
              f"{o['bound_s']:g} s later)")
    for kind in ("session_routes", "affinity_routes"):
        for actor, n in sorted(d.get(kind, {}).items()):
            print(f"    {kind.replace('_', ' ')} {actor}: {n} sessions")
    if d.get("priorities"):
        print(f"    priorities: {d['priorities']} sessions")
    for node, per in sorted(d.get("scale", {}).items()):
        print(f"    instances wanted on {node}: " + ", ".join(f"{a} x{c}" for a, c in sorted(per.items())))


async def _status(a: argparse.Namespace) -> int:
    started = time.monotonic()
    client = await cli_client(a, "operator")
    try:
        nodes = await client.status_async(_left(a, started))
        policy = await client.policy_status_async(min(_left(a, started), 1.0))
    finally:
        await client.aclose()
    if a.json:
        sys.stdout.write(orjson.dumps({"nodes": nodes, "policy": policy}, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_status(nodes, policy)
    return 0 if nodes else 1


async def _state(a: argparse.Namespace) -> int:
    started = time.monotonic()
    client = await cli_client(a, "operator")
    try:
        if a.state_cmd == "migrate":
            out = await client.migrate_async(a.session, a.src, a.dst, _left(a, started))
            print(f"moved {', '.join(out['moved']) or 'nothing'} of session {a.session!r} from {out['from']} to "
                  f"{out['to']}: {out['bytes']:,} bytes in {out['ms']:.1f} ms")
            return 0
        try:
            got = await asyncio.wait_for(client.state_async(a.session, a.state_cmd), _left(a, started))
        except asyncio.TimeoutError:
            _err(f"no node answered about session {a.session!r} within {a.timeout:g} s")
            return exits.REMOTE
    except RemoteError as e:
        _err(str(e))
        return exits.REMOTE
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
        return exits.USAGE

    _apply_replicas(a)

    def ready(node: Any, url: str) -> None:
        served = ", ".join(f"{g.name} x{len(g.instances)}" for g in node.groups.values())
        print(f"nalar node {node.name} ready on {url} (namespace {node.rt.subjects.ns!r}): {served}"
              f"{metrics_cli.said(metrics)}", flush=True)

    if a.max_queue is not None and a.max_queue < 1:
        _err("--max-queue must be >= 1")
        return exits.USAGE
    metrics = metrics_cli.endpoint(a)
    asyncio.run(serve_node(specs, a.nats, a.namespace, a.name, ready, grace=a.grace, state_dir=a.state_dir,
                           max_queue=a.max_queue, metrics=metrics, resources=_declared(a)))
    return 0


def _specs(texts: list[str], demo: bool) -> list[tuple[type, int | None]]:
    from .specs import parse_spec

    specs = [parse_spec(t) for t in texts]
    if demo:
        from ..workloads.demo import DEMO

        specs = list(DEMO) + specs
    return specs


def _dispatch(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(a, "timeout", None) is not None or a.cmd == "call":
        from ..actors.runtime import check_timeout, default_timeout

        a.timeout = check_timeout(default_timeout() if a.timeout is None else a.timeout)
    if a.cmd == "up":
        from .up import run_up

        from ..policy import load_policies

        _apply_replicas(a)
        return run_up(_specs(a.actors, not a.actors), a.namespace, a.data_dir, load_policies(a.policies),
                      a.interval, insecure=a.insecure, host=a.host, port=a.port, name=a.name,
                      max_payload=a.max_payload, fresh=a.fresh, gateway_port=a.gateway_port,
                      gateway_host=a.gateway_host, metrics_port=a.metrics_port, resources=_declared(a))
    if a.cmd == "auth":
        from . import auth as auth_cli

        return auth_cli.run(a)
    if a.cmd == "gateway":
        from . import gateway_cmd

        return gateway_cmd.run(a)
    if a.cmd == "nats":
        from . import nats as nats_cli

        return nats_cli.run(a)
    if a.cmd == "completion":
        from . import completion

        return completion.run(a, parser)
    if a.cmd == "policy":
        from .policy import serve_policy

        if a.interval <= 0:
            _err("--interval must be > 0")
            return exits.USAGE
        asyncio.run(serve_policy(a.nats, a.namespace, a.policies, a.interval, name=a.name,
                                 metrics=metrics_cli.endpoint(a)))
        return exits.OK
    if a.cmd == "node":
        return _node(a)
    if a.cmd == "call":
        from .call import run_call

        return asyncio.run(run_call(a))
    if a.cmd == "status":
        return asyncio.run(_status(a))
    if a.cmd == "top":
        from . import top as top_cli

        return top_cli.run(a)
    if a.cmd == "state":
        return asyncio.run(_state(a))
    if a.cmd == "bench":
        from ..workloads import bench

        return bench.main(a.what, a.rest)
    return exits.USAGE


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logs.start(a)  # traces' service.name; logging for the serving commands
    incomplete = settle(a)
    if incomplete is not None:  # bare `nalar`, `nalar state`: what the choices are, not an error
        incomplete.print_help()
        return exits.OK
    try:
        return _dispatch(a, parser)
    except BusError as e:
        _err(e)
        return exits.CONNECT
    except RemoteError as e:
        _err(e)
        return exits.REMOTE
    except (NalarError, ValueError, TypeError) as e:
        _err(e)
        return exits.USAGE
    except BrokenPipeError:
        raise
    except RuntimeError as e:
        from ..actors.node.hosting import StartFailed  # (not imported for commands that serve nothing)

        if not isinstance(e, StartFailed):
            raise
        _err(e)  # the user's on_start: what and where, in a line
        return exits.REMOTE
    except OSError as e:  # a directory that cannot be made, a file that cannot be read
        _err(f"{e.strerror or e}: {e.filename}" if e.filename else e)
        return exits.USAGE


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (``cli/exits.py``)."""
    try:
        try:
            rc = _run(argv)
        except SystemExit:  # argparse's --help, --version and usage errors: their output is flushed too
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a reader that went away shows here, while it can still be handled
        return rc
    except BrokenPipeError:
        # `nalar status | head -1`: the reader has what it wanted. Point stdout at /dev/null so the
        # interpreter's last flush cannot fail again, and exit as a writer killed by SIGPIPE reports.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.BROKEN_PIPE
    except KeyboardInterrupt:
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
