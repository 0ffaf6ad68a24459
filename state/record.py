"""One commit of a unit as its log holds it: what changed, its version, its future and reply.

A record is a JSON header line, then raw segments in the order the header lists them::

    {"v": 7, "f": "<future id>", "m": "append", "a": 0, "t": 1764650000.1, "n": "node-a", "k": "d",
     "w": [["notes", "x", 17], ["n", "s", 1]], "r": 42, "q": [["<fid>", 6, 40], ...]}
    <17 bytes: the items appended to notes, a JSON array><1 byte: n's new value><42 bytes: the reply>...

``k`` is ``d`` (a delta on top of version v-1) or ``s`` (a snapshot: every object of the unit in
full, and in ``q`` the futures of the versions before it with their replies, so a node that catches up
from the snapshot still recognises a retried call). A write is ``s`` (the object's new value in full)
or ``x`` (items appended to a list: a history appended to 1,000 times records 1,000 small deltas, not
1,000 copies of itself).
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import orjson

from ..bus.errors import StateError

SET, EXTEND = "s", "x"
DELTA, SNAPSHOT = "d", "s"


class Change(NamedTuple):
    """One object's change: ``data`` is the new value (``SET``) or the appended items (``EXTEND``)."""

    name: str
    op: str
    data: bytes


class Record(NamedTuple):
    version: int
    future: str
    method: str
    attempt: int
    node: str
    kind: str
    writes: list[Change]
    reply: bytes
    futures: list[tuple[str, int, bytes]]  # snapshots only: (future id, version, reply)
    at: float = 0.0


def encode(r: Record) -> bytes:
    head: dict[str, Any] = {"v": r.version, "f": r.future, "m": r.method, "a": r.attempt, "t": r.at or round(time.time(), 6),
                            "n": r.node, "k": r.kind, "w": [[c.name, c.op, len(c.data)] for c in r.writes],
                            "r": len(r.reply)}
    if r.futures:
        head["q"] = [[f, v, len(b)] for f, v, b in r.futures]
    parts = [orjson.dumps(head), b"\n"]
    parts.extend(c.data for c in r.writes)
    parts.append(r.reply)
    parts.extend(b for _, _, b in r.futures)
    return b"".join(parts)


def _bad(why: str) -> StateError:
    return StateError(f"a garbled record in the state log: {why}")


def decode(data: bytes) -> Record:
    """The record in ``data``; anything malformed is a ``StateError`` (it is never half-applied)."""
    line, sep, rest = data.partition(b"\n")
    try:
        h = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise _bad("its header is not JSON") from None
    if not sep or not isinstance(h, dict):
        raise _bad("no header line")
    try:
        v, fid, kind = h["v"], h["f"], h["k"]
        if not (isinstance(v, int) and v >= 1 and isinstance(fid, str) and kind in (DELTA, SNAPSHOT)):
            raise ValueError
        pos = 0
        writes = []
        for name, op, n in h["w"]:
            if op not in (SET, EXTEND) or not isinstance(name, str) or not isinstance(n, int) or n < 0:
                raise ValueError
            writes.append(Change(name, op, rest[pos:pos + n]))
            pos += n
        rn = int(h["r"])
        reply = rest[pos:pos + rn]
        pos += rn
        futures = []
        for f, fv, n in h.get("q", ()):
            futures.append((str(f), int(fv), rest[pos:pos + n]))
            pos += n
        if pos != len(rest):
            raise ValueError
        return Record(v, fid, str(h.get("m", "")), int(h.get("a", 0)), str(h.get("n", "")), kind, writes, reply,
                      futures, float(h.get("t", 0.0)))
    except (KeyError, TypeError, ValueError):
        raise _bad("its header does not describe its body") from None


def extend(current: bytes, items: bytes) -> bytes:
    """``current`` (a JSON array) with ``items`` (a JSON array) appended, without parsing either."""
    if current[:1] != b"[" or current[-1:] != b"]" or items[:1] != b"[" or items[-1:] != b"]":
        raise StateError("an append to a managed list found something that is not a list")
    if items == b"[]":
        return current
    if current == b"[]":
        return items
    return current[:-1] + b"," + items[1:]


def appended(original: bytes, new: bytes) -> bytes | None:
    """The items ``new`` appends to ``original`` (both JSON arrays), or None if it is not an append.

    JSON values are self-delimiting, so ``new`` extends ``original`` exactly when it starts with
    ``original`` minus its closing bracket and goes on with a comma at that point.
    """
    n = len(original)
    if n < 3 or original[:1] != b"[" or len(new) <= n or new[n - 1] != 0x2C or not new.startswith(original[:-1]):
        return None
    return b"[" + new[n:]
