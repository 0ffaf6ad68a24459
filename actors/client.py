"""The client: how code outside a node (a script, a web handler, the CLI) calls into a deployment.

``nalar.connect(url)`` runs the connection on a background loop, so it works from plain sync code;
``await nalar.connect_async(url)`` uses the caller's running loop instead (fastest from async code).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ..bus import discovery, envelope as env
from ..bus.connection import ConnectOptions, open_connection
from ..bus.errors import BusError
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


async def gather(rt: Runtime, subject: str, timeout: float, quiet: float, what: str) -> list[dict[str, Any]]:
    """Ask everyone on ``subject``; collect the answers (objects) until none came for ``quiet`` seconds."""
    out: list[dict[str, Any]] = []

    def on(data: bytes, headers: dict[str, str] | None) -> bool | None:
        if is_no_responders(data, headers):
            return True  # nobody at all: nothing to wait for
        try:
            ok, value = env.decode_reply(data)
        except Exception:
            rt.count_malformed("status-reply")
            return None  # not a status: the quiet window starts with the first real one
        if ok and isinstance(value, dict):
            out.append(value)
            return False
        return None

    await rt.scatter(subject, b"{}", on, timeout, quiet)
    if not out:
        check_permitted(rt, subject, what)
    return out


async def gather_status(rt: Runtime, timeout: float = 2.0, quiet: float = 0.3) -> list[dict[str, Any]]:
    """Ask every node for its status; collect answers until none came for ``quiet`` seconds."""
    out = await gather(rt, rt.subjects.status, timeout, quiet, "ask nodes for their status")
    return sorted(out, key=lambda s: str(s.get("node")))


def check_permitted(rt: Runtime, subject: str, what: str) -> None:
    """Silence after a request can be the server refusing it: say so, not "nobody answered"."""
    refused = getattr(rt.transport, "refused", None)
    if refused is not None and refused(subject):
        raise BusError(f"this connection's credential may not {what} ({subject}): the NATS server refused it. "
                       "Use an operator credential: nalar.connect(role='operator') on the machine of a "
                       "`nalar up`, or NALAR_NATS_NKEY=operator.nk")


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

    async def policy_status_async(self, timeout: float = 1.0, quiet: float = 0.2) -> dict[str, Any] | None:
        """The leading policy actor's status (its policies, rounds and the decisions in force), or ``None``
        if no policy actor answered.

        Every policy actor of the namespace is asked (answers are collected until none came for
        ``quiet`` seconds). Added: ``leader`` (its name) and ``term``, ``standbys`` (their names) and
        ``actors`` (name, role and term of each). If only standbys answer, the first one's status
        (``role`` says so; ``leader`` is the lease holder they see, if any).
        """
        got = await gather(self.runtime, self.runtime.subjects.policy_status, timeout, quiet,
                           "ask the policy actor for its status")
        if not got:
            return None

        def term(st: dict[str, Any]) -> int:
            t = st.get("term")
            return t if isinstance(t, int) else 0

        deciding = [st for st in got if st.get("role", "single") in ("leader", "single")]
        pick = max(deciding, key=term) if deciding else got[0]
        out = dict(pick)
        if pick in deciding:
            out["leader"], out["term"] = pick.get("name"), term(pick)
        else:
            out["term"] = pick.get("leader_term", 0)
        out["standbys"] = sorted(str(st.get("name")) for st in got if st.get("role") == "standby")
        out["actors"] = sorted(({"name": st.get("name"), "role": st.get("role", "single"), "term": term(st)}
                                for st in got), key=lambda a: (a["role"] != "leader", str(a["name"])))
        return out

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
                       start: bool = True, role: str = "client") -> Runtime:
    """The bootstrap every process shares: a NATS connection, its ``NatsTransport``, a ``Runtime`` on the
    running loop, started.

    ``url`` and ``namespace`` default as for ``connect``; ``on_closed`` runs if the connection is lost for
    good; ``connection_name`` is how the server lists it (default ``name``). A node passes
    ``start=False`` to name the runtime's decision table (``table.here``) before it loads decisions.
    ``role`` (client, operator, node, policy) picks the credential when none is given (``bus/auth.py``).
    """
    ns = resolve_namespace(namespace)
    opts = ConnectOptions.resolve(url, role=role, namespace=ns, name=connection_name or name)
    nc = await open_connection(opts, on_closed)
    rt = Runtime(NatsTransport(nc), ns, name=name, principal=opts.principal(),
                 kv_reads=role not in ("client", "operator"))  # which get no JetStream rights
    if start:
        await rt.start()
    return rt


async def _open(url: str | None, namespace: str | None, name: str, role: str) -> tuple[Runtime, str]:
    rt = await open_runtime(url, namespace, name, role=role)
    return rt, rt.transport.connected_url


def connect(url: str | None = None, namespace: str | None = None, *, name: str = "nalar-client",
            role: str = "client") -> Client:
    """Connect from sync code. ``url`` defaults to ``NALAR_NATS_URL`` or the local ``nalar up``.

    ``role`` picks which of the local ``nalar up``'s credentials to use when none are in the
    environment: ``client`` (calls only) or ``operator`` (also status and session state)."""
    lt = LoopThread("nalar-client")
    try:
        rt, connected = lt.run(_open(url, namespace, name, role), 30)
    except BaseException:
        lt.stop()
        raise
    c = Client(rt, lt, connected)
    c._previous_default = set_default_runtime(rt)
    return c


async def connect_async(url: str | None = None, namespace: str | None = None, *,
                        name: str = "nalar-client", role: str = "client") -> Client:
    """Connect on the running loop (no extra thread)."""
    rt, connected = await _open(url, namespace, name, role)
    c = Client(rt, None, connected)
    c._previous_default = set_default_runtime(rt)
    return c
