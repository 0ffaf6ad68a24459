"""Helpers shared by the benchmarks: child processes that say when they are ready, RSS, medians."""
from __future__ import annotations

import os
import queue
import statistics
import subprocess
import sys
import threading
from typing import Any, Sequence


class Child:
    """A child process whose stdout we read until a ready marker appears."""

    def __init__(self, args: list[str], marker: str, env: dict[str, str] | None = None, timeout: float = 60) -> None:
        e = dict(os.environ, PYTHONUNBUFFERED="1")
        e.update(env or {})
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
        lines: "queue.Queue[str]" = queue.Queue()
        self.output: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        while True:
            line = lines.get(timeout=timeout)
            if not line:
                raise RuntimeError(f"{args[:4]} exited before it was ready:\n" + "".join(self.output))
            if marker in line:
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_for(url: str | None) -> tuple[Any, str]:
    """Use the given NATS URL, or start an embedded server for this run (returned so it can be stopped)."""
    if url:
        return None, url
    from ..bus.server import EmbeddedNats

    server = EmbeddedNats()
    return server, server.start()


def node_process(url: str, namespace: str, *specs: str) -> Child:
    return Child([sys.executable, "-m", "nalar.cli.main", "node", *specs, "--nats", url, "--namespace", namespace,
                  "--name", "bench"], " ready on ")


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")
