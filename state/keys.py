"""How session state is laid out in LMDB (one environment per node, one B-tree, prefixed keys).

A *unit* is one (session, actor): its managed objects, its versions and its log travel together.

==============================================  ==============================================
key                                             value
==============================================  ==============================================
``h`` unit                                      head: ``{"v": version, "o": {name: version}}``
``o`` unit ``\\0`` name ``\\0`` version(8 B)      one object's value at that version (orjson)
``l`` unit ``\\0`` version(8 B)                   log: future id, method, time, names written,
                                                the versions they superseded
``f`` future id                                 ``{"u": unit, "v": version}`` newline reply body
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


def obj(u: bytes, name: str, version: int) -> bytes:
    return b"o" + u + SEP + name.encode() + SEP + _V.pack(version)


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
