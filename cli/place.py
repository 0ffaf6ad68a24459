"""Where ``nalar up`` keeps what must outlive it: JetStream's store, session state, its node name, its port.

Everything lives in one directory (default ``$NALAR_HOME/up/<namespace>``), so a restart finds its
sessions, and nodes started separately find the server again at the same address. ``--fresh`` drops
it on purpose.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..bus import discovery
from ..bus.errors import BusError
from ..bus.subjects import check_token

DEFAULT_PORT = 4222
_REMEMBERED = "up-node.json"


@dataclass
class Place:
    data_dir: Path
    name: str
    port: int  # -1: any free one (the server picks it)
    remembered_port: bool  # the port is the last run's: if it is taken, say so rather than move

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"

    def remember(self, port: int) -> None:
        """Keep the name and the port the server got, for the next run."""
        body = orjson.dumps({"name": self.name, "port": port})
        tmp = self.data_dir / (_REMEMBERED + ".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.data_dir / _REMEMBERED)


def default_dir(namespace: str) -> Path:
    return discovery.home() / "up" / check_token(namespace, "namespace")


def default_name() -> str:
    """A node name that stays the same across restarts on this machine (not HOST-PID)."""
    host = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname())[:40] or "host"
    return f"up-{host}"


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def settle(namespace: str, data_dir: str | None, host: str, port: int | None, name: str | None,
           fresh: bool, say: Any = print) -> Place:
    """Decide the directory, the node name and the port; ``fresh`` drops what an earlier run kept."""
    d = Path(data_dir) if data_dir else default_dir(namespace)
    if fresh and d.exists():
        shutil.rmtree(d)
        say(f"--fresh: dropped {d} (its sessions and JetStream store)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        kept = orjson.loads((d / _REMEMBERED).read_bytes())
        if not isinstance(kept, dict):
            kept = {}
    except (OSError, orjson.JSONDecodeError):
        kept = {}
    node = name or (kept.get("name") if isinstance(kept.get("name"), str) else None) or default_name()
    check_token(node, "node name")
    remembered = False
    if port is None:
        last = kept.get("port")
        if isinstance(last, int) and 0 < last < 65536:
            port, remembered = last, True
        else:
            port = DEFAULT_PORT if _free(host, DEFAULT_PORT) else -1
    if port > 0 and not _free(host, port):
        why = "the port the last run used (nodes started separately reconnect to it)" if remembered else "--port"
        raise BusError(f"{host}:{port} is taken ({why}): stop what listens there, or give another --port")
    return Place(d, node, port, remembered)
