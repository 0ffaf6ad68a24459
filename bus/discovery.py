"""How commands find the ``nalar up`` running on this machine without flags.

``nalar up`` writes ``$NALAR_HOME/up.json`` (default ``~/.nalar``) with its NATS URL, namespace, pid
and whether it runs with credentials (where they are), and removes it on exit. A file whose pid is gone is stale and ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def home() -> Path:
    return Path(os.environ.get("NALAR_HOME") or Path.home() / ".nalar")


def _file() -> Path:
    return home() / "up.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_running(url: str, namespace: str, pid: int | None = None, *, insecure: bool = False,
                  auth: str | None = None, server_pid: int | None = None) -> Path:
    """Say where the local ``nalar up`` is; ``auth`` is its credentials directory (``None``: insecure)."""
    path = _file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "namespace": namespace, "pid": pid or os.getpid(), "insecure": insecure,
                               "auth": auth, "server_pid": server_pid}))
    os.replace(tmp, path)
    return path


def find_running() -> dict[str, Any] | None:
    try:
        info = json.loads(_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return info


def clear_running(pid: int | None = None) -> None:
    info = find_running()
    if info is None or info.get("pid") == (pid or os.getpid()):
        try:
            _file().unlink()
        except OSError:
            pass
