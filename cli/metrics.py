"""``--metrics-port``/``--metrics-addr`` of the serving commands, and the endpoint they start.

A node process (with the policy actor too under ``nalar up``) or a policy process serves every
collector it has on one port, from its own loop (``actors/prometheus.py``): one process, one scrape
target. Off unless asked for (``--metrics-port``, ``$NALAR_METRICS_PORT``), on loopback unless told
otherwise (``--metrics-addr``, ``$NALAR_METRICS_ADDR``): the series name actors and instances, which
is nobody else's business. ``nalar up`` turns it on at 9464, or any free port if that one is taken.
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..actors.prometheus import ADDR_ENV, DEFAULT_ADDR, PORT_ENV, MetricsServer, new_registry
from .args import port_or_zero

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from ..actors.node import Node
    from ..policy import PolicyActor

#: ``nalar up``'s port unless told otherwise.
UP_PORT = 9464


def add_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", type=port_or_zero, default=os.environ.get(PORT_ENV, "0"), metavar="PORT",
                   help=f"serve Prometheus metrics of {what} at http://ADDR:PORT/metrics (default: ${PORT_ENV}, "
                        "else 0: off)")
    p.add_argument("--metrics-addr", default=os.environ.get(ADDR_ENV, DEFAULT_ADDR), metavar="ADDR",
                   help=f"the address the metrics listen on (default: ${ADDR_ENV}, else {DEFAULT_ADDR}, this "
                        "machine only; 0.0.0.0 for a scraper on another host or container)")


def add_up_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=port_or_zero, default=os.environ.get(PORT_ENV, str(UP_PORT)),
                   metavar="PORT", help=f"serve the node's and the policy actor's Prometheus metrics on "
                                        f"127.0.0.1:PORT/metrics (default: ${PORT_ENV}, else {UP_PORT}; any free "
                                        "port if it is taken; 0: off)")


def endpoint(a: argparse.Namespace, pick_free: bool = False) -> "Endpoint | None":
    port = getattr(a, "metrics_port", 0)
    return Endpoint(port, getattr(a, "metrics_addr", DEFAULT_ADDR), pick_free) if port else None


class Endpoint:
    """The metrics a process serves: started with its collectors once they have something to read."""

    def __init__(self, port: int, addr: str = DEFAULT_ADDR, pick_free: bool = False) -> None:
        self.port, self.addr, self.pick_free = port, addr, pick_free
        self.server: MetricsServer | None = None

    @property
    def url(self) -> str:
        return self.server.url if self.server is not None else f"http://{self.addr}:{self.port}/metrics"

    async def start(self, *collectors: "Collector") -> None:
        reg = new_registry()
        for c in collectors:
            reg.register(c)
        self.server = await MetricsServer(reg, self.addr, self.port).start(self.pick_free)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


def said(m: "Endpoint | None") -> str:
    """For a ready line: where the metrics are, or nothing."""
    return f"; metrics on {m.url}" if m is not None and m.server is not None else ""


def node_collectors(node: "Node", policy: "PolicyActor | None" = None) -> "list[Collector]":
    """The collectors of a node process: the node's, and the policy actor's where it runs there too."""
    from ..actors.node.metrics import NodeCollector

    out: "list[Collector]" = [NodeCollector(node.book, node.rt, node.enforcer, lambda: node.sessions)]
    if policy is not None:
        from ..policy.metrics import PolicyCollector

        out.append(PolicyCollector(policy))
    return out
