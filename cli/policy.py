"""``nalar policy``: run the policy actor in its own process until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import signal
from typing import Any

from ..actors.client import open_runtime
from ..bus.errors import BusError
from ..policy import PolicyActor, load_policies
from .metrics import Endpoint, said


async def serve_policy(url: str | None, namespace: str | None, policies: str | None, interval: float,
                       stop: asyncio.Event | None = None, out: Any = print, name: str | None = None,
                       metrics: Endpoint | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    lost: list[bool] = []

    def on_closed() -> None:
        if not stop.is_set():
            lost.append(True)
            stop.set()

    installed = load_policies(policies)
    rt = await open_runtime(url, namespace, "policy", on_closed, connection_name="nalar-policy", role="policy")
    actor = PolicyActor(rt, installed, interval, name=name)
    try:
        await actor.start()
        if metrics is not None:
            from ..policy.metrics import PolicyCollector

            await metrics.start(PolicyCollector(actor))
        out(f"nalar policy actor ready (namespace {rt.subjects.ns!r}, every {interval:g} s, decisions v"
            f"{actor.table.version}, {actor.name}: {_role(actor)}): "
            f"{', '.join(p.name for p in installed) or 'no policies'}{said(metrics)}", flush=True)
        await actor.run(stop)
    finally:
        if metrics is not None:
            await metrics.stop()
        await actor.stop()
        await rt.close()
    if lost:
        raise BusError("the NATS connection was closed for good; the policy actor stopped")


def _role(actor: PolicyActor) -> str:
    if actor.role == "leader":
        return f"leading, term {actor.term}"
    if actor.role == "standby":
        held = actor.lease.holder if actor.lease is not None else ""
        return f"standby{f' (leader {held})' if held else ''}"
    return "no JetStream: deciding alone"
