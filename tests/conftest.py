"""Fixtures: a real nats-server per test session, real node processes, a namespace per test."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import nalar
from nalar.bus.server import EmbeddedNats

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(data_dir=str(tmp_path_factory.mktemp("nats")))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never find (or clobber) a developer's own `nalar up`."""
    monkeypatch.setenv("NALAR_HOME", str(tmp_path / "nalar-home"))
    monkeypatch.delenv("NALAR_NATS_URL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("NALAR_GATEWAY_PORT", "0")  # `nalar up` without its gateway, unless a test asks for one
    e.update(extra or {})
    return e


class NodeProc:
    """A `nalar node` OS process; ``start`` returns once it printed its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], cmd: str = "node", marker: str = " ready on ") -> None:
        self.marker = marker
        self.proc = subprocess.Popen([sys.executable, "-m", "nalar.cli.main", cmd, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put("")

    def wait_ready(self, timeout: float = 60) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if not line:
                raise RuntimeError("node exited before it was ready:\n" + "".join(self.output))
            if self.marker in line:
                return line

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_node(nats_url: str, namespace: str, tmp_path: Path) -> Iterator[Callable[..., NodeProc]]:
    procs: list[NodeProc] = []

    def start(*specs: str, name: str | None = None, env: dict[str, str] | None = None) -> NodeProc:
        state = tmp_path / "state" / (name or f"node{len(procs)}")
        args = [*specs, "--nats", nats_url, "--namespace", namespace, "--grace", "1", "--state-dir", str(state)]
        if name:
            args += ["--name", name]
        p = NodeProc(args, node_env(env))
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def client(nats_url: str, namespace: str) -> Iterator[nalar.Client]:
    c = nalar.connect(nats_url, namespace)
    yield c
    c.close()


def free_port() -> int:
    """A loopback port nothing listens on right now (the kernel picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll real state (not a sleep standing in for an event) until it holds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
