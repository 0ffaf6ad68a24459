"""One log line per failed call, on the logger ``nalar.calls`` at WARNING (format: ``cli/logs.py``).

The line names the call (``actor.method``), the error's kind and type, the request, the future, the
session and, when the caller traced it, the trace id; the fields also ride as ``extra`` attributes so
the JSON format has them as keys. Volume is bounded: one line per failed call, no traceback for the
kinds a caller causes or expects (bad request, deadline, cancelled, overloaded...), and a user-code
error's traceback at most once per distinct error (type, message, place) per ``TRACEBACK_EVERY``.
Only failures pay anything: a successful call never reaches this module.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("nalar.calls")
#: Silent unless the process sets up logging (the CLI's serving commands do: ``cli/logs.py``), so a
#: library or ``nalar.local`` user's stderr gets no lines from Python's last-resort handler.
log.addHandler(logging.NullHandler())

#: Seconds between two tracebacks of the same error (type, message, place).
TRACEBACK_EVERY = 60.0
#: Distinct errors remembered for that (the oldest are forgotten first).
KEPT = 1024
#: Kinds whose traceback is worth a line: the method (user code) or the node's state failed.
_TRACED_KINDS = {"error", "state", "state_full"}
_last_tb: dict[tuple[str, str, str], float] = {}


def trace_id(traceparent: str | None) -> str:
    """The trace id of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``), or ""."""
    if not traceparent or len(traceparent) < 35:
        return ""
    return traceparent[3:35]


def _place(tb: str) -> str:
    """Where it was raised: the traceback's last ``File ..., line N`` line."""
    for line in reversed(tb.splitlines()):
        s = line.strip()
        if s.startswith("File "):
            return s
    return ""


def _traceback_due(etype: str, message: str, tb: str, now: float) -> bool:
    key = (etype, message[:200], _place(tb))
    last = _last_tb.get(key)
    if last is not None and now - last < TRACEBACK_EVERY:
        return False
    _last_tb.pop(key, None)
    _last_tb[key] = now
    while len(_last_tb) > KEPT:
        del _last_tb[next(iter(_last_tb))]
    return True


def failed(actor: str, method: str, meta: Any, error: dict[str, Any] | None, node: str) -> None:
    """Log one failed call (``meta``: its ``CallMeta``; ``error``: the wire error it was answered with)."""
    if not log.isEnabledFor(logging.WARNING):
        return
    e = error or {}
    kind = str(e.get("kind") or "error")
    etype = str(e.get("type") or "Exception")
    message = str(e.get("message") or "")
    tb = str(e.get("traceback") or "")
    fields: dict[str, Any] = {
        "call": f"{actor}.{method}", "actor": actor, "method": method, "error_kind": kind, "error_type": etype,
        "error_message": message[:500], "request_id": meta.request or meta.id, "future_id": meta.id, "node": node}
    if meta.session is not None:
        fields["session"] = meta.session
    tid = trace_id(meta.traceparent)
    if tid:
        fields["trace_id"] = tid
    if tb and kind in _TRACED_KINDS and _traceback_due(etype, message, tb, time.monotonic()):
        fields["traceback"] = tb
    ids = f"request={fields['request_id']} future={meta.id}" + (f" trace={tid}" if tid else "")
    log.warning("call failed: %s.%s %s %s: %s (%s)", actor, method, kind, etype, message[:500], ids,
                extra={"nalar": fields})
