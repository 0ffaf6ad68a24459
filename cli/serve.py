"""Run a node until SIGINT/SIGTERM: shared by ``nalar node`` and ``nalar up``."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any, Callable

from ..actors.client import open_runtime
from ..actors.node import Node
from ..actors.runtime import set_default_runtime
from ..bus import tracing
from ..bus.errors import BusError


async def serve_node(specs: list[tuple[type, int | None]], url: str | None, namespace: str | None,
                     name: str | None, on_ready: Callable[[Node, str], None],
                     stop: asyncio.Event | None = None, grace: float = 10.0,
                     state_dir: str | None = None, policies: list[Any] | None = None,
                     interval: float = 1.0, max_queue: int | None = None) -> None:
    """Serve until a signal (a second one exits at once) or until the connection is lost for good.

    With ``policies`` (a list, possibly empty), the policy actor runs here too, on the node's loop.

    Raises ``BusError`` in the latter case so the process exits non-zero and a supervisor restarts it.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    lost: list[bool] = []

    def on_signal() -> None:
        if stop.is_set():
            print("nalar: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            pass

    def on_closed() -> None:
        if not stop.is_set():
            lost.append(True)
            stop.set()

    # not started yet: the node names the runtime's decision table first (``table.here``), and hooks its
    # decisions handler in at its own start, replaying what the runtime loaded
    rt = await open_runtime(url, namespace, name or "node", on_closed,
                            connection_name=f"nalar-node-{name or ''}".rstrip("-"), start=False, role="node")
    node = Node(rt, specs, name=name, state_dir=state_dir, **({"max_queue": max_queue} if max_queue else {}))
    rt.name = node.name
    await rt.start()
    set_default_runtime(rt)
    control: Any = None
    policy_rt: Any = None
    loop_task: asyncio.Task[None] | None = None
    try:
        await node.start()
        if policies is not None:
            from ..policy import PolicyActor

            # its own connection, with the policy role's credential: a node's may not publish decisions
            policy_rt = await open_runtime(url, rt.subjects.ns, "policy", on_closed, connection_name="nalar-policy",
                                           role="policy")
            control = PolicyActor(policy_rt, policies, interval)
            await control.start()
            loop_task = loop.create_task(control.run(stop))
        on_ready(node, rt.transport.connected_url)
        await stop.wait()
    finally:
        if loop_task is not None:
            await loop_task
        if control is not None:
            await control.stop()
        if policy_rt is not None:
            await policy_rt.close()
        await node.stop(grace)
        tracing.shutdown()
    if lost:
        raise BusError("the NATS connection was closed for good; the node stopped")
