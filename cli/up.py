"""``nalar up``: an embedded NATS server and a node serving the demo (or given) actors, in one command.

By default the server admits only nalar's credentials (``bus/auth.py``): they are created once under
``$NALAR_HOME/auth/<namespace>`` and every nalar command on this machine finds them. ``--insecure``
runs the server open, for tests and throwaway experiments, and says so.

Everything else it keeps under ``$NALAR_HOME/up/<namespace>`` (``cli/place.py``): a restart finds its
sessions, and nodes started separately reconnect to the same address. A stop (Ctrl-C, which a
terminal sends to the whole process group, or SIGTERM) goes in order: the node drains (running calls
get a second, then they and the queued ones are answered ``Cancelled``), then the policy actor, then
the server. If the server dies, ``nalar up`` says so and exits 1.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from typing import Any

from ..actors.node import Node
from ..bus import auth, discovery
from ..bus.server import DEFAULT_MAX_PAYLOAD, EmbeddedNats
from . import place as places
from .serve import serve_node
from .metrics import Endpoint
from .up_gateway import GatewayChild

#: Seconds running calls get to finish when ``nalar up`` stops, before they are answered ``Cancelled``.
STOP_GRACE = 1.0

INSECURE_WARNING = (
    "WARNING: --insecure: the NATS server accepts anyone who can reach {url} without credentials: they can\n"
    "         read and change every session's state, forge decisions and answer calls. Tests and\n"
    "         throwaway experiments only."
)


def _join_url(host: str, port: int) -> str:
    """The address other hosts use: the machine's name when the server listens on every interface."""
    if host in ("0.0.0.0", "::", ""):
        return f"nats://{socket.gethostname()}:{port}"
    return f"nats://{host}:{port}"


def _banner(node: Node, url: str, namespace: str, where: places.Place, creds: auth.Credentials | None,
            join: str, max_payload: int, gateway: GatewayChild | None = None,
            metrics: Endpoint | None = None, listening: bool = False) -> str:
    served = ", ".join(f"{g.name} x{len(g.instances)}" for g in node.groups.values())
    first = next(iter(node.groups.values()))
    example = ("nalar call Analyst.analyze '[\"the quick brown fox jumps over the lazy dog\"]'"
               if "Analyst" in node.groups else f"nalar call {first.name}.{sorted(first.methods)[0]} '[]'")
    if creds is not None:
        access = [f"  auth       credentials per role (client, operator, node, policy) in {creds.path}",
                  "             (this machine's nalar commands use them by themselves; `nalar auth show` lists them)"]
        elsewhere = f"  join       NALAR_NATS_URL={join} NALAR_NATS_NKEY=/copy/of/{creds.path.name}/node.nk nalar node ..."
    else:
        access = [INSECURE_WARNING.format(url=url)]
        elsewhere = f"  join       NALAR_NATS_URL={join} nalar node ..."
    return "\n".join([
        "nalar is up",
        f"  NATS       {url}   (namespace {namespace!r}, messages up to {max_payload:,} bytes)",
        f"  data       {where.data_dir}   (JetStream and session state: kept across restarts; --fresh drops them)",
        *access,
        f"  node       {node.name} serving {served}",
        "  policy     the policy actor runs here too (nalar status shows its decisions)",
        *([f"  gateway    {gateway.address}   (HTTP: POST /v1/actors/ACTOR/METHOD, and OpenAI's /v1/chat/completions, "
           "/v1/completions, /v1/models)"] if gateway is not None and listening else []),
        *([f"  metrics    {metrics.url}   (Prometheus: the node's and the policy actor's"
           + (f"; port {metrics.port} was taken" if metrics.server is not None and metrics.server.port != metrics.port
              else "")
           + (f"; the gateway's at {gateway.address}/metrics)" if gateway is not None and listening else ")")]
          if metrics is not None and metrics.server is not None else []),
        "  try        " + example,
        "             nalar status",
        *(["             nalar call Notebook.add '[\"buy milk\"]' --session me && nalar state show me"]
          if "Notebook" in node.groups else []),
        elsewhere,
        "  Ctrl-C stops everything.",
    ])


def run_up(specs: list[tuple[type, int | None]], namespace: str, data_dir: str | None, policies: list[Any] | None = None,
           interval: float = 1.0, out: Any = None, insecure: bool = False, host: str = "127.0.0.1",
           port: int | None = None, name: str | None = None, max_payload: int | None = None,
           fresh: bool = False, gateway_port: int = 8000, gateway_host: str = "127.0.0.1",
           metrics_port: int = 0, resources: dict[str, float] | None = None) -> int:
    out = out or sys.stdout
    running = discovery.find_running()
    if running is not None:
        print(f"nalar up is already running (pid {running['pid']}, {running['url']}); stop it first",
              file=sys.stderr)
        return 1
    where = places.settle(namespace, data_dir, host, port, name, fresh,
                          say=lambda m: print(m, file=out, flush=True))
    creds: auth.Credentials | None = None
    includes: list[str] = []
    if not insecure:
        creds = auth.Credentials(auth.default_dir(namespace), namespace)
        creds.init()  # the first time only: later runs keep the same credentials (copied ones stay valid)
        includes.append(str(creds.include_file))  # re-read on a reload: `nalar auth add` takes effect at once
    limit = max_payload or DEFAULT_MAX_PAYLOAD
    server = EmbeddedNats(data_dir=str(where.data_dir), host=host, port=where.port, includes=includes,
                          max_payload=limit)
    url = server.start()
    where.remember(server.port)
    join = _join_url(host, server.port)
    if insecure:
        print(INSECURE_WARNING.format(url=url), file=sys.stderr, flush=True)
    discovery.write_running(url, namespace, insecure=insecure, auth=None if creds is None else str(creds.path),
                            server_pid=server.proc.pid if server.proc else None)
    died: list[int] = []
    metrics = Endpoint(metrics_port, "127.0.0.1", pick_free=True) if metrics_port else None  # node and policy
    gateway = GatewayChild(url, namespace, gateway_host, gateway_port) if gateway_port else None
    if gateway is not None:
        gateway.launch(out)  # beside the node's start; its banner line waits for it

    async def main() -> None:
        stop = asyncio.Event()

        async def watch() -> None:  # the server is our child: if it dies, so does this deployment
            while not stop.is_set():
                code = server.proc.poll() if server.proc is not None else 0
                if code is not None:
                    died.append(code)
                    logging.getLogger("nalar.bus").setLevel(logging.ERROR)  # no reconnect chatter: we know
                    stop.set()
                    return
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass

        watcher = asyncio.get_running_loop().create_task(watch())

        announced: list[asyncio.Future[None]] = []

        def ready(node: Node, connected: str) -> None:
            # Both banners made here, on the node's loop (they read its groups); the one that holds is
            # printed off it, once the gateway listens or failed (its start asks the node for decisions).
            bare = _banner(node, url, namespace, where, creds, join, limit, None, metrics)
            full = _banner(node, url, namespace, where, creds, join, limit, gateway, metrics, listening=True)

            def announce() -> None:
                ok = gateway is not None and gateway.wait(out)
                print(full if ok else bare, file=out, flush=True)
            announced.append(asyncio.get_running_loop().run_in_executor(None, announce))

        try:
            await serve_node(specs, url, namespace, where.name, ready, stop=stop, grace=STOP_GRACE,
                             state_dir=str(where.state_dir), policies=policies if policies is not None else [],
                             interval=interval, lost_ok=lambda: bool(died), metrics=metrics, resources=resources)
        except Exception:
            if not died:
                raise  # with the server gone, what failed on the way down is no news
        finally:
            stop.set()
            if gateway is not None:  # first: it answers its HTTP clients while the node still serves
                await asyncio.get_running_loop().run_in_executor(None, gateway.stop)
            await watcher

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            gateway.stop()
        discovery.clear_running(os.getpid())
        server.stop()
    if died:
        print(f"nalar: the NATS server (nats-server, pid {server.pid_was}) exited with code {died[0]}; nalar up "
              f"stopped. Its last words:\n{server.log_tail(3)}", file=sys.stderr, flush=True)
        return 1
    print("nalar stopped", file=out, flush=True)
    return 0
