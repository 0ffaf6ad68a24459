"""How a node's copy of session state is laid out in LMDB (one environment, one B-tree, prefixed keys).

The copy is materialised from the units' logs (``log``): the latest value of each object, a window of
recent versions, and the future-id index that answers a retried call without running it again.

A *unit* is one (session, actor): its managed objects, its versions and its log travel together.

==============================================  ==============================================
key                                             value
==============================================  ==============================================
``h`` unit                                      head: ``{"v": version, "s": log sequence applied,
                                                "b": latest snapshot's sequence, "c"/"d": messages and
                                                bytes since it, "z": bytes of the objects,
                                                "o": {name: version last written}}``
``o`` unit ``\\0`` name                           one object's latest value (orjson)
``l`` unit ``\\0`` version(8 B)                   log window: future id, method, time, names written,
                                                node, log sequence
``f`` future id                                 ``{"u": unit, "v": version}`` newline reply body
``!layout``                                     the layout's version (``LAYOUT``)
==============================================  ==============================================

``unit`` is ``session \\0 actor``. Versions are big-endian so a prefix scan walks them in order.
"""
from __future__ import annotations

import re
import struct

_NAME = re.compile(r"^[A-Za-z0-9_\-.:]{1,64}$")
_V = struct.Struct(">Q")
SEP = b"\x00"


def check_object_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"managed object name {name!r}: use 1-64 letters, digits, '_', '-', '.', ':'")
    return name


#: LMDB keys are at most 511 bytes; a unit's longest key adds a name (64), separators and a version.
MAX_SESSION_BYTES = 256
MAX_ACTOR_BYTES = 64


def unit(session: str, actor: str) -> bytes:
    s, a = session.encode(), actor.encode()
    if SEP in s or not s or len(s) > MAX_SESSION_BYTES:
        raise ValueError(f"a session id for state must be 1-{MAX_SESSION_BYTES} bytes of UTF-8 without NUL")
    if len(a) > MAX_ACTOR_BYTES:
        raise ValueError(f"a stateful actor's name must be at most {MAX_ACTOR_BYTES} bytes")
    return s + SEP + a


def split_unit(u: bytes) -> tuple[str, str]:
    s, _, a = u.partition(SEP)
    return s.decode(), a.decode()


def head(u: bytes) -> bytes:
    return b"h" + u


LAYOUT = b"2"
LAYOUT_KEY = b"!layout"


def obj(u: bytes, name: str) -> bytes:
    return b"o" + u + SEP + name.encode()


def obj_prefix(u: bytes) -> bytes:
    return b"o" + u + SEP


def log(u: bytes, version: int) -> bytes:
    return b"l" + u + SEP + _V.pack(version)


def log_prefix(u: bytes) -> bytes:
    return b"l" + u + SEP


def version_of(key: bytes) -> int:
    return int(_V.unpack(key[-8:])[0])


def future(fid: str) -> bytes:
    return b"f" + fid.encode()


def session_prefix(session: str) -> bytes:
    """Heads of every unit of a session (all its actors)."""
    return b"h" + session.encode() + SEP
