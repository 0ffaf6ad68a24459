"""``nalar up``: an embedded NATS server and a node serving the demo (or given) actors, in one command."""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from ..actors.node import Node
from ..bus import discovery
from ..bus.server import EmbeddedNats
from .serve import serve_node


def _banner(node: Node, url: str, namespace: str, data_dir: str) -> str:
    served = ", ".join(f"{g.name} x{len(g.instances)}" for g in node.groups.values())
    first = next(iter(node.groups.values()))
    example = ("nalar call Analyst.analyze '[\"the quick brown fox jumps over the lazy dog\"]'"
               if "Analyst" in node.groups else f"nalar call {first.name}.{sorted(first.methods)[0]} '[]'")
    return "\n".join([
        "nalar is up",
        f"  NATS       {url}   (namespace {namespace!r}, JetStream data in {data_dir})",
        f"  node       {node.name} serving {served}",
        "  policy     the policy actor runs here too (nalar status shows its decisions)",
        "  try        " + example,
        "             nalar status",
        *(["             nalar call Notebook.add '[\"buy milk\"]' --session me && nalar state show me"]
          if "Notebook" in node.groups else []),
        f"  elsewhere  NALAR_NATS_URL={url} nalar status",
        "  Ctrl-C stops everything.",
    ])


def run_up(specs: list[tuple[type, int | None]], namespace: str, data_dir: str | None, policies: list[Any] | None = None,
           interval: float = 1.0, out: Any = None) -> int:
    out = out or sys.stdout
    running = discovery.find_running()
    if running is not None:
        print(f"nalar up is already running (pid {running['pid']}, {running['url']}); stop it first",
              file=sys.stderr)
        return 1
    server = EmbeddedNats(data_dir=data_dir)
    url = server.start()
    discovery.write_running(url, namespace)
    try:
        def ready(node: Node, connected: str) -> None:
            print(_banner(node, url, namespace, server.data_dir), file=out, flush=True)

        asyncio.run(serve_node(specs, url, namespace, None, ready, state_dir=os.path.join(server.data_dir, "state"),
                               policies=policies if policies is not None else [], interval=interval))
    except KeyboardInterrupt:
        pass
    finally:
        discovery.clear_running(os.getpid())
        server.stop()
        print("nalar stopped", file=out, flush=True)
    return 0
