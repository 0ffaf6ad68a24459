"""``nalar up``'s gateway: ``nalar gateway`` as a child process, started beside the node.

A process of its own, not a task on the node's loop: HTTP parsing and the node's calls then use both
cores, and the figures of the gateway alone (``nalar bench --via http``) hold for ``nalar up``. It
listens on loopback unless told otherwise (it has no API key of its own here), dies with ``nalar up``
(``PR_SET_PDEATHSIG``), and a busy port is said in a line without stopping the rest: the deployment
is still reachable over NATS.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import IO

from ..bus.server import die_with_parent

#: Seconds the gateway has to say it listens.
START_TIMEOUT_S = 30.0
READY = "listening on"


class GatewayChild:
    """One ``nalar gateway`` process: launched at once, waited for when the banner is printed."""

    def __init__(self, url: str, namespace: str, host: str, port: int) -> None:
        self.url, self.namespace, self.host, self.port = url, namespace, host, port
        self.address = f"http://{host}:{port}"
        self.proc: subprocess.Popen[str] | None = None
        self.settled = threading.Event()  # it listens, or it exited
        self.listening = False
        self.said: list[str] = []

    def launch(self, out: IO[str]) -> None:
        env = dict(os.environ, NALAR_NATS_URL=self.url, NALAR_NAMESPACE=self.namespace)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nalar.cli.main", "gateway", "--host", self.host, "--port", str(self.port),
             "--nats", self.url, "--namespace", self.namespace],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=die_with_parent if sys.platform == "linux" else None, start_new_session=True)
        threading.Thread(target=self._pump, args=(out,), daemon=True, name="nalar-up-gateway").start()

    def _pump(self, out: IO[str]) -> None:
        """Its output: kept until it listens; after that (a failed call's log line) passed to ``out``."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.listening:
                print(line, end="", file=out, flush=True)
            elif READY in line:
                self.listening = True
                self.settled.set()
            else:
                self.said.append(line.strip())
        self.settled.set()

    def wait(self, out: IO[str], timeout: float = START_TIMEOUT_S) -> bool:
        """True once it listens; else what it said goes to ``out`` (the rest runs on without it)."""
        self.settled.wait(timeout)
        if self.listening:
            return True
        self.stop()
        why = " ".join(s for s in self.said if s)[-400:] or f"no word within {timeout:g} s"
        print(f"nalar: the gateway did not start on {self.host}:{self.port} ({why}); the rest runs without it "
              "(--gateway-port PORT to choose another, 0 for none)", file=out, flush=True)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
