"""The client: how code outside a node (a script, a web handler, the CLI) calls into a deployment.

``nalar.connect(url)`` runs the connection on a background loop, so it works from plain sync code;
``await nalar.connect_async(url)`` uses the caller's running loop instead (fastest from async code).
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

from ..bus import discovery, envelope as env
from ..bus.connection import ConnectOptions, open_connection
from ..bus.transport import NatsTransport, is_no_responders
from .loop import LoopThread
from .runtime import Runtime, current_runtime, set_default_runtime
from .stub import Stub


def resolve_namespace(namespace: str | None) -> str:
    if namespace:
        return namespace
    if os.environ.get("NALAR_NAMESPACE"):
        return os.environ["NALAR_NAMESPACE"]
    if not os.environ.get("NALAR_NATS_URL"):
        running = discovery.find_running()
        if running and isinstance(running.get("namespace"), str):
            return str(running["namespace"])
    return "default"


async def gather_status(rt: Runtime, timeout: float = 2.0, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Ask every node for its status; collect answers until none came for ``quiet`` seconds."""
    out: list[dict[str, Any]] = []

    def on(data: bytes, headers: dict[str, str] | None) -> bool | None:
        if is_no_responders(data, headers):
            return True  # no node at all: nothing to wait for
        try:
            ok, value = env.decode_reply(data)
        except Exception:
            rt.count_malformed("status-reply")
            return None  # not a status: the quiet window starts with the first real one
        if ok and isinstance(value, dict):
            out.append(value)
            return False
        return None

    await rt.scatter(rt.subjects.status, b"{}", on, timeout, quiet)
    return sorted(out, key=lambda s: str(s.get("node")))


class Client:
    """A handle on a deployment: stubs, status, and closing the connection."""

    def __init__(self, runtime: Runtime, loop_thread: LoopThread | None = None, url: str = "") -> None:
        self.runtime = runtime
        self.url = url
        self._lt = loop_thread
        self._previous_default: Runtime | None = None

    def stub(self, target: Any, **options: Any) -> Stub:
        """A stub bound to this client: ``client.stub("Echo").echo("hi").result()``."""
        return Stub(target, self.runtime, **options)

    def status(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        if self._lt is None:
            raise RuntimeError("this client runs on your loop: use `await client.status_async()`")
        return self._lt.run(gather_status(self.runtime, timeout), timeout + 5)

    async def status_async(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        return await gather_status(self.runtime, timeout)

    async def policy_status_async(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The policy actor's status (its policies, rounds and the decisions in force), or ``None``."""
        from ..bus.errors import UnknownActor

        try:
            got = await self.runtime.request(self.runtime.subjects.policy_status, {}, timeout)
        except (UnknownActor, asyncio.TimeoutError):
            return None
        return got if isinstance(got, dict) else None

    def policy_status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        return self._run(self.policy_status_async(timeout))

    # -- session state ------------------------------------------------------------------------------
    async def state_async(self, session: str, what: str = "show") -> dict[str, Any]:
        """``session``'s state: ``show`` (latest objects) or ``log`` (versions), from its log.

        One node hosting stateful actors answers, after catching its copy up with the log (so any
        node's answer is the same); if it cannot, the next one is asked.
        """
        if what not in ("show", "log"):
            raise ValueError("what is 'show' or 'log'")
        last: Exception | None = None
        for st in await gather_status(self.runtime, 2.0):
            if not st.get("state"):
                continue
            node = str(st["node"])
            try:
                got = await self.runtime.request(self.runtime.subjects.node(node), {"op": what, "session": session},
                                                 30.0)
            except Exception as e:  # that node is gone or its log unreachable: ask another
                last = e
                continue
            units = got.get("units", {})
            return {"session": session, "units": units, "nodes": {a: node for a in units}}
        if last is not None:
            raise last
        return {"session": session, "units": {}, "nodes": {}}

    def state_show(self, session: str) -> dict[str, Any]:
        return self._run(self.state_async(session, "show"))

    def state_log(self, session: str) -> dict[str, Any]:
        return self._run(self.state_async(session, "log"))

    async def migrate_async(self, session: str, src: str, dst: str, timeout: float = 300.0) -> dict[str, Any]:
        """Warm ``dst`` for ``session``: it catches every unit of the session up with the log.

        Correctness never depends on where a session runs (any node serves any unit from the log);
        this is for locality. ``src`` is kept for the answer and for older callers.
        """
        got = await self.runtime.request(self.runtime.subjects.node(dst), {"op": "pull", "session": session,
                                                                           "from": src}, timeout)
        got["from"] = src
        return got  # type: ignore[no-any-return]

    def migrate(self, session: str, src: str, dst: str, timeout: float = 300.0) -> dict[str, Any]:
        return self._run(self.migrate_async(session, src, dst, timeout), timeout + 5)

    def _run(self, coro: Any, timeout: float = 60.0) -> Any:
        if self._lt is None:
            coro.close()
            raise RuntimeError("this client runs on your loop: use the *_async method")
        return self._lt.run(coro, timeout)

    def close(self) -> None:
        """Close the connection (pending calls fail as cancelled); closing twice is fine."""
        if self._lt is None:
            raise RuntimeError("this client runs on your loop: use `await client.aclose()`")
        if self.runtime.closed:
            return
        try:
            self._lt.run(self.runtime.close(), 15)
        finally:
            self._lt.stop()
            self._forget()

    async def aclose(self) -> None:
        if self.runtime.closed:
            return
        await self.runtime.close()
        self._forget()

    def _forget(self) -> None:
        try:
            if current_runtime() is self.runtime:
                set_default_runtime(self._previous_default)
        except Exception:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_runtime(url: str | None, namespace: str | None, name: str,
                       on_closed: Callable[[], None] | None = None, *, connection_name: str | None = None,
                       start: bool = True) -> Runtime:
    """The bootstrap every process shares: a NATS connection, its ``NatsTransport``, a ``Runtime`` on the
    running loop, started.

    ``url`` and ``namespace`` default as for ``connect``; ``on_closed`` runs if the connection is lost for
    good; ``connection_name`` is how the server lists it (default ``name``). A node passes
    ``start=False`` to name the runtime's decision table (``table.here``) before it loads decisions.
    """
    nc = await open_connection(ConnectOptions.resolve(url, name=connection_name or name), on_closed)
    rt = Runtime(NatsTransport(nc), resolve_namespace(namespace), name=name)
    if start:
        await rt.start()
    return rt


async def _open(url: str | None, namespace: str | None, name: str) -> tuple[Runtime, str]:
    rt = await open_runtime(url, namespace, name)
    return rt, rt.transport.connected_url


def connect(url: str | None = None, namespace: str | None = None, *, name: str = "nalar-client") -> Client:
    """Connect from sync code. ``url`` defaults to ``NALAR_NATS_URL`` or the local ``nalar up``."""
    lt = LoopThread("nalar-client")
    try:
        rt, connected = lt.run(_open(url, namespace, name), 30)
    except BaseException:
        lt.stop()
        raise
    c = Client(rt, lt, connected)
    c._previous_default = set_default_runtime(rt)
    return c


async def connect_async(url: str | None = None, namespace: str | None = None, *,
                        name: str = "nalar-client") -> Client:
    """Connect on the running loop (no extra thread)."""
    rt, connected = await _open(url, namespace, name)
    c = Client(rt, None, connected)
    c._previous_default = set_default_runtime(rt)
    return c
