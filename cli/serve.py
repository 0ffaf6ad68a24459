"""Run a node until SIGINT/SIGTERM: shared by ``nalar node`` and ``nalar up``."""
from __future__ import annotations

import asyncio
import signal
from typing import Callable

from ..actors.client import resolve_namespace
from ..actors.node import Node
from ..actors.runtime import Runtime, set_default_runtime
from ..bus import tracing
from ..bus.connection import ConnectOptions, open_connection
from ..bus.transport import NatsTransport


async def serve_node(specs: list[tuple[type, int | None]], url: str | None, namespace: str | None,
                     name: str | None, on_ready: Callable[[Node, str], None],
                     stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    opts = ConnectOptions.resolve(url, name=f"nalar-node-{name or ''}".rstrip("-"))
    nc = await open_connection(opts)
    transport = NatsTransport(nc)
    rt = Runtime(transport, resolve_namespace(namespace), name=name or "node")
    node = Node(rt, specs, name=name)
    rt.name = node.name
    await rt.start()
    set_default_runtime(rt)
    try:
        await node.start()
        on_ready(node, transport.connected_url)
        await stop.wait()
    finally:
        await node.stop()
        tracing.shutdown()
