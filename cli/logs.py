"""Logging for the serving commands (``nalar node``, ``nalar up``, ``nalar policy``): text or JSON on stderr.

``--log-format text|json`` (env ``NALAR_LOG_FORMAT``, default text) and ``--log-level`` (env
``NALAR_LOG_LEVEL``, default WARNING). A JSON line is one object: ``ts``, ``level``, ``logger``,
``message`` and a record's nalar fields (a failed call's ``call``, ``error_type``, ``request_id``,
``future_id``, ``trace_id``..., from ``actors/node/faillog.py``) as keys of their own.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The commands that serve (and log), by their traces' role; every other command is ``nalar-cli``.
#: (``gateway``: its parser may call ``add_args``; without the flags it logs as the environment says.)
SERVING = {"node": "node", "up": "node", "policy": "policy", "gateway": "gateway"}


def add_args(p: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--log-level`` on a serving command's parser."""
    p.add_argument("--log-format", choices=FORMATS, default=None,
                   help="log lines as text or as one JSON object each (default: $NALAR_LOG_FORMAT, else text)")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None, metavar="LEVEL",
                   help="the least severe level logged: DEBUG, INFO, WARNING, ERROR (default: $NALAR_LOG_LEVEL, "
                        "else WARNING; a failed call is a WARNING)")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _iso(record.created), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        fields = getattr(record, "nalar", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "nalar", None)
        tb = fields.get("traceback") if isinstance(fields, dict) else None
        if tb:
            text += "\n  " + "\n  ".join(str(tb).rstrip().splitlines())
        return text


def setup(fmt: str | None = None, level: str | None = None) -> None:
    """Send the process's logs to stderr in ``fmt`` from ``level`` up (None: the environment's, else the
    defaults). A second call replaces the first's handler."""
    fmt = (fmt or os.environ.get("NALAR_LOG_FORMAT") or "text").strip().lower()
    name = (level or os.environ.get("NALAR_LOG_LEVEL") or "WARNING").strip().upper()
    bad = []
    if fmt not in FORMATS:
        bad.append(f"NALAR_LOG_FORMAT={fmt!r} is not one of {', '.join(FORMATS)}: using text")
        fmt = "text"
    if name not in LEVELS:
        bad.append(f"NALAR_LOG_LEVEL={name!r} is not one of {', '.join(LEVELS)}: using WARNING")
        name = "WARNING"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_nalar", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h._nalar = True  # type: ignore[attr-defined]
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(h)
    root.setLevel(getattr(logging, name))
    for why in bad:
        logging.getLogger("nalar").warning("%s", why)


def start(args: argparse.Namespace) -> None:
    """At the CLI's start: say what this process is (its traces' ``service.name``), and for the
    serving commands set up logging from ``--log-format``/``--log-level``."""
    from ..bus import tracing

    cmd = getattr(args, "cmd", None)
    tracing.set_role(SERVING.get(cmd or "", "cli"))
    if cmd in SERVING:
        setup(getattr(args, "log_format", None), getattr(args, "log_level", None))
