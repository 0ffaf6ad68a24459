"""The wire format of a unit moving between nodes: framed LMDB records and a SHA-256 at the end.

``NLS1`` then, per record, key length and value length (4 bytes each, big-endian), key, value; then
the SHA-256 of everything before it. ``unpack`` checks all of it, and that every record belongs to the
unit being moved, before anything is written: garbage is a ``StateError``, never a write.
"""
from __future__ import annotations

import hashlib
import struct

import orjson

from ..bus.errors import StateError
from . import keys as K

MAGIC = b"NLS1"
_LEN = struct.Struct(">II")


def pack(records: list[tuple[bytes, bytes]]) -> bytes:
    parts = [MAGIC]
    for k, v in records:
        parts.append(_LEN.pack(len(k), len(v)))
        parts.append(k)
        parts.append(v)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _bad(why: str) -> StateError:
    return StateError(f"bad state transfer: {why}")


def unpack(data: bytes, unit: bytes) -> list[tuple[bytes, bytes]]:
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise _bad("not a nalar state transfer")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise _bad("checksum mismatch (corrupted or truncated)")
    out: list[tuple[bytes, bytes]] = []
    pos = len(MAGIC)
    head, objs, logs = K.head(unit), K.obj_prefix(unit), K.log_prefix(unit)
    who = list(K.split_unit(unit))
    while pos < len(body):
        if pos + _LEN.size > len(body):
            raise _bad("truncated record header")
        kl, vl = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if pos + kl + vl > len(body):
            raise _bad("truncated record")
        k, v = body[pos:pos + kl], body[pos + kl:pos + kl + vl]
        pos += kl + vl
        if k == head or k.startswith(objs) or k.startswith(logs):
            pass
        elif k.startswith(b"f"):
            meta = v.partition(b"\n")[0]
            try:
                owner = orjson.loads(meta).get("u")
            except (orjson.JSONDecodeError, AttributeError):
                raise _bad("a future record is garbled") from None
            if owner != who:
                raise _bad("a future record belongs to another unit")
        else:
            raise _bad("a record does not belong to the unit being moved")
        out.append((k, v))
    if not out or out[0][0] != head:
        raise _bad("the unit's head record is missing")
    return out


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]
