"""``nalar up``: an embedded NATS server and a node serving the demo (or given) actors, in one command.

By default the server admits only nalar's credentials (``bus/auth.py``): they are created once under
``$NALAR_HOME/auth/<namespace>`` and every nalar command on this machine finds them. ``--insecure``
runs the server open, for tests and throwaway experiments, and says so.
"""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from ..actors.node import Node
from ..bus import auth, discovery
from ..bus.server import EmbeddedNats
from .serve import serve_node

INSECURE_WARNING = (
    "WARNING: --insecure: the NATS server accepts anyone who can reach {url} without credentials: they can\n"
    "         read and change every session's state, forge decisions and answer calls. Tests and\n"
    "         throwaway experiments only."
)


def _banner(node: Node, url: str, namespace: str, data_dir: str, creds: auth.Credentials | None) -> str:
    served = ", ".join(f"{g.name} x{len(g.instances)}" for g in node.groups.values())
    first = next(iter(node.groups.values()))
    example = ("nalar call Analyst.analyze '[\"the quick brown fox jumps over the lazy dog\"]'"
               if "Analyst" in node.groups else f"nalar call {first.name}.{sorted(first.methods)[0]} '[]'")
    if creds is not None:
        access = [f"  auth       credentials per role (client, operator, node, policy) in {creds.path}",
                  "             (this machine's nalar commands use them by themselves; `nalar auth show` lists them)"]
        elsewhere = (f"  elsewhere  NALAR_NATS_URL={url} NALAR_NATS_NKEY=/copy/of/{creds.path.name}/operator.nk "
                     "nalar status")
    else:
        access = [INSECURE_WARNING.format(url=url)]
        elsewhere = f"  elsewhere  NALAR_NATS_URL={url} nalar status"
    return "\n".join([
        "nalar is up",
        f"  NATS       {url}   (namespace {namespace!r}, JetStream data in {data_dir})",
        *access,
        f"  node       {node.name} serving {served}",
        "  policy     the policy actor runs here too (nalar status shows its decisions)",
        "  try        " + example,
        "             nalar status",
        *(["             nalar call Notebook.add '[\"buy milk\"]' --session me && nalar state show me"]
          if "Notebook" in node.groups else []),
        elsewhere,
        "  Ctrl-C stops everything.",
    ])


def run_up(specs: list[tuple[type, int | None]], namespace: str, data_dir: str | None, policies: list[Any] | None = None,
           interval: float = 1.0, out: Any = None, insecure: bool = False) -> int:
    out = out or sys.stdout
    running = discovery.find_running()
    if running is not None:
        print(f"nalar up is already running (pid {running['pid']}, {running['url']}); stop it first",
              file=sys.stderr)
        return 1
    creds: auth.Credentials | None = None
    includes: list[str] = []
    if not insecure:
        creds = auth.Credentials(auth.default_dir(namespace), namespace)
        creds.init()  # the first time only: later runs keep the same credentials (copied ones stay valid)
        includes.append(str(creds.include_file))  # re-read on a reload: `nalar auth add` takes effect at once
    server = EmbeddedNats(data_dir=data_dir, includes=includes)
    url = server.start()
    if insecure:
        print(INSECURE_WARNING.format(url=url), file=sys.stderr, flush=True)
    discovery.write_running(url, namespace, insecure=insecure, auth=None if creds is None else str(creds.path),
                            server_pid=server.proc.pid if server.proc else None)
    try:
        def ready(node: Node, connected: str) -> None:
            print(_banner(node, url, namespace, server.data_dir, creds), file=out, flush=True)

        asyncio.run(serve_node(specs, url, namespace, None, ready, state_dir=os.path.join(server.data_dir, "state"),
                               policies=policies if policies is not None else [], interval=interval))
    except KeyboardInterrupt:
        pass
    finally:
        discovery.clear_running(os.getpid())
        server.stop()
        print("nalar stopped", file=out, flush=True)
    return 0
