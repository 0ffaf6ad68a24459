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
from .metrics import Endpoint, node_collectors


async def _bounded(aw: Any, seconds: float, what: str, quiet: bool = False) -> None:
    """Wait for a step of a stop, but not forever (a dead server must not hold the process up)."""
    try:
        await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        if not quiet:
            print(f"nalar: {what} did not finish within {seconds:g} s; going on", file=sys.stderr, flush=True)
    except Exception as e:  # a stop goes on whatever one step raised
        if not quiet:
            print(f"nalar: {what} failed: {e!r:.200}", file=sys.stderr, flush=True)


async def serve_node(specs: list[tuple[type, int | None]], url: str | None, namespace: str | None,
                     name: str | None, on_ready: Callable[[Node, str], None],
                     stop: asyncio.Event | None = None, grace: float = 10.0,
                     state_dir: str | None = None, policies: list[Any] | None = None,
                     interval: float = 1.0, max_queue: int | None = None,
                     lost_ok: Callable[[], bool] | None = None, metrics: Endpoint | None = None,
                     resources: dict[str, float] | None = None) -> None:
    """Serve until a signal (a second one exits at once) or until the connection is lost for good.

    With ``policies`` (a list, possibly empty), the policy actor runs here too, on the node's loop.
    A stop goes in order: the node drains (``grace``), then the policy actor, then the connections.
    ``resources``: what the node declares it has (the rest is read from the machine).
    With ``metrics``, the node's (and that policy actor's) Prometheus metrics are served from this loop.

    Raises ``BusError`` in the latter case so the process exits non-zero and a supervisor restarts it
    (unless ``lost_ok()`` says the caller knows why, as ``nalar up`` does when its own server died).
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
    node = Node(rt, specs, name=name, state_dir=state_dir, resources=resources,
                **({"max_queue": max_queue} if max_queue else {}))
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
        if metrics is not None:
            await metrics.start(*node_collectors(node, control))
        on_ready(node, rt.transport.connected_url)
        await stop.wait()
    finally:
        gone = lost_ok is not None and lost_ok()  # no server: nothing to drain to, do not wait on it
        await _bounded(node.stop(0 if gone else grace), 1 if gone else grace + 5, "the node's stop", gone)
        if loop_task is not None:  # its round ends at the stop (a round in flight: bounded too)
            await _bounded(loop_task, 0.5 if gone else 10, "the policy actor's last round", gone)
        if control is not None:
            await _bounded(control.stop(), 0.5 if gone else 5, "the policy actor's stop", gone)
        if policy_rt is not None:
            await _bounded(policy_rt.close(), 0.5 if gone else 5, "the policy actor's connection", gone)
        if metrics is not None:
            await metrics.stop()
        tracing.shutdown()
    if lost and not (lost_ok is not None and lost_ok()):
        raise BusError("the NATS connection was closed for good; the node stopped")
