"""A nats-server cluster on loopback (3 servers by default), for drills and benchmarks that need one.

Each server is the real ``nats-server`` binary (``nalar.bus.server.find_server_binary``) with its own
JetStream store, a stable ``server_name`` and fixed client and route ports, so ``kill(i)`` (SIGKILL) then
``restart(i)`` brings back the same member on the same store and ports. ``start`` returns once every
server printed its ready line and JetStream has a meta leader (answered ``account_info`` through every
server). ``stream_leader`` says which ``server_name`` leads a stream.

Servers die with the thread that started them (``PR_SET_PDEATHSIG``), so a killed test run leaves no
orphan behind: call ``start`` and ``restart`` from a thread that outlives the cluster (the main thread).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .server import DEFAULT_MAX_PAYLOAD, die_with_parent

MAX_PAYLOAD = DEFAULT_MAX_PAYLOAD


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on now (the kernel picks them; tiny race until bound)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class _Server:
    def __init__(self, index: int, name: str, port: int, route_port: int, data_dir: Path) -> None:
        self.index = index
        self.name = name
        self.port = port
        self.route_port = route_port
        self.data_dir = data_dir
        self.conf = data_dir / "nats.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=60)
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """``size`` clustered nats-servers with JetStream on 127.0.0.1."""

    def __init__(self, base_dir: str | os.PathLike[str], size: int = 3, *, cluster_name: str = "nalar-test",
                 binary: str | None = None, startup_timeout: float = 30.0) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one server")
        self.base = Path(base_dir)
        self.size = size
        self.cluster_name = cluster_name
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.servers: list[_Server] = []

    # -- addresses -------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (what ``--nats`` and ``NALAR_NATS_URL`` take for a cluster)."""
        return ",".join(self.urls)

    def names(self) -> list[str]:
        return [s.name for s in self.servers]

    def index_of(self, server_name: str) -> int:
        for s in self.servers:
            if s.name == server_name:
                return s.index
        raise KeyError(f"no server named {server_name!r} in this cluster (it has {self.names()})")

    def alive(self, i: int) -> bool:
        return self.servers[i].alive

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Start every server and wait for JetStream's meta leader; the client URLs."""
        self._spawn_all()
        asyncio.run(wait_jetstream(self.urls, self.startup_timeout))
        return self.urls

    async def start_async(self) -> list[str]:
        """``start`` from inside a running loop (the servers still belong to the calling thread)."""
        self._spawn_all()
        await wait_jetstream(self.urls, self.startup_timeout)
        return self.urls

    def _spawn_all(self) -> None:
        if self.binary is None:
            from .server import find_server_binary

            self.binary = find_server_binary()
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            ports = free_ports(2 * self.size)
            self.servers = [_Server(i, f"n{i}", ports[2 * i], ports[2 * i + 1], self.base / f"n{i}")
                            for i in range(self.size)]
            for s in self.servers:
                self._write_conf(s)
            try:
                for s in self.servers:
                    self._spawn(s)
                for s in self.servers:
                    self._wait_ready_line(s, time.monotonic() + self.startup_timeout)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise

    def kill(self, i: int) -> None:
        """SIGKILL server ``i``: no goodbye to its routes, no flush of its store."""
        s = self.servers[i]
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start server ``i`` again, on the same store dir and ports (after ``kill``)."""
        s = self.servers[i]
        if s.alive:
            raise RuntimeError(f"server {s.name} is still running: kill it first")
        self._spawn(s)
        if wait:
            self.wait_started(i)

    def wait_started(self, i: int, timeout: float | None = None) -> None:
        """Block until server ``i`` printed its ready line (safe to call from a worker thread)."""
        self._wait_ready_line(self.servers[i], time.monotonic() + (timeout or self.startup_timeout))

    def stop(self) -> None:
        for s in self.servers:
            p, s.proc = s.proc, None
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def logs(self, i: int) -> str:
        return "".join(self.servers[i].log)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------
    def _write_conf(self, s: _Server) -> None:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f'"nats-route://127.0.0.1:{o.route_port}"' for o in self.servers if o is not s)
        s.conf.write_text("\n".join([
            f'server_name: "{s.name}"',
            f'listen: "127.0.0.1:{s.port}"',
            f"max_payload: {MAX_PAYLOAD}",
            f'jetstream {{ store_dir: "{s.data_dir / "jetstream"}", max_file_store: 1G, max_memory_store: 256M }}',
            f'cluster {{ name: "{self.cluster_name}", listen: "127.0.0.1:{s.route_port}", routes: [{routes}] }}',
        ]) + "\n")

    def _spawn(self, s: _Server) -> None:
        assert self.binary is not None
        s.ready = threading.Event()  # type: ignore[attr-defined]
        s.starts += 1
        s.proc = subprocess.Popen(
            [self.binary, "-c", str(s.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        proc, ready = s.proc, s.ready  # type: ignore[attr-defined]

        def pump() -> None:
            assert proc.stderr is not None
            for line in iter(proc.stderr.readline, b""):
                s.log.append(line.decode(errors="replace"))
                if b"Server is ready" in line:
                    ready.set()
            ready.set()  # exited: wake the waiter

        threading.Thread(target=pump, name=f"nats-{s.name}-log", daemon=True).start()

    def _wait_ready_line(self, s: _Server, deadline: float) -> None:
        ready: threading.Event = s.ready  # type: ignore[attr-defined]
        ok = ready.wait(max(0.0, deadline - time.monotonic()))
        if not ok or not s.alive:
            why = "did not get ready in time" if not ok else f"exited with {s.proc.returncode if s.proc else '?'}"
            raise RuntimeError(f"nats-server {s.name} (:{s.port}) {why}:\n" + "".join(list(s.log)[-20:]))


async def wait_jetstream(urls: list[str], timeout: float = 30.0) -> None:
    """Until JetStream answers ``account_info`` through every one of ``urls`` (it has a meta leader)."""
    import nats

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    for url in urls:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"JetStream had no meta leader within {timeout:g} s (through {url}): {last!r}")
            nc = None
            try:
                nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
                await nc.jetstream(timeout=2).account_info()
                break
            except Exception as e:  # not yet: no leader, or the server is still binding
                last = e
                await asyncio.sleep(0.2)
            finally:
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()


async def stream_info(urls: list[str] | str, stream: str, timeout: float = 10.0) -> Any | None:
    """``js.stream_info(stream)`` through any server that answers; None if the stream does not exist.

    Retries through a leader election for up to ``timeout`` seconds; raises if nobody answers.
    """
    import nats
    from nats.js.errors import NotFoundError

    servers = urls.split(",") if isinstance(urls, str) else list(urls)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        nc = None
        try:
            nc = await nats.connect(servers=servers, connect_timeout=2, allow_reconnect=False)
            return await nc.jetstream(timeout=2).stream_info(stream)
        except NotFoundError:
            return None
        except Exception as e:
            last = e
            await asyncio.sleep(0.2)
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
    raise RuntimeError(f"no server answered stream_info({stream!r}) within {timeout:g} s: {last!r}")


async def stream_leader(urls: list[str] | str, stream: str, timeout: float = 10.0) -> str | None:
    """The ``server_name`` leading ``stream`` (None: no such stream); waits out an election."""
    deadline = time.monotonic() + timeout
    while True:
        info = await stream_info(urls, stream, max(1.0, deadline - time.monotonic()))
        if info is None:
            return None
        leader = getattr(info.cluster, "leader", None) if info.cluster is not None else None
        if leader:
            return str(leader)
        if time.monotonic() > deadline:
            raise RuntimeError(f"stream {stream!r} had no leader within {timeout:g} s")
        await asyncio.sleep(0.2)


async def list_streams(urls: list[str] | str, timeout: float = 5.0) -> list[str]:
    """Names of the account's streams (for diagnostics)."""
    import nats

    servers = urls.split(",") if isinstance(urls, str) else list(urls)
    nc = await nats.connect(servers=servers, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=timeout)
        return [str(s.config.name) for s in await js.streams_info()]
    finally:
        await nc.close()
