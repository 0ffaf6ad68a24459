"""Reading a store written before the log (layout 1), so a node upgraded in place loses nothing.

Layout 1 kept every version of every object (``o`` unit ``\\0`` name ``\\0`` version), a head
``{"v", "o": {name: version}}``, a log window and the future index, and no log anywhere else. A node
that finds such a store moves it aside (it is never deleted) and puts each of its units into the log
as a snapshot, unless the log already has that unit (then the log is newer, and the truth).
"""
from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

import lmdb
import orjson

from . import keys as K

_V = struct.Struct(">Q")


class OldUnit(NamedTuple):
    unit: bytes
    version: int
    objects: dict[str, bytes]
    futures: list[tuple[str, int, bytes]]  # (future id, version, reply) of the versions it still knew


def is_old_store(path: str) -> bool:
    """Does ``path`` hold an LMDB store with data but no layout mark (layout 1)?"""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return False
    env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=0)
    try:
        with env.begin() as txn:
            return txn.get(K.LAYOUT_KEY) is None and txn.stat()["entries"] > 0
    finally:
        env.close()


def read_old_store(path: str) -> list[OldUnit]:
    """Every unit of a layout-1 store: its latest objects and the futures of its log window."""
    env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=0)
    out: list[OldUnit] = []
    try:
        with env.begin() as txn:
            cur = txn.cursor()
            heads: list[tuple[bytes, dict[str, Any]]] = []
            if cur.set_range(b"h"):
                for k, v in cur:
                    if not k.startswith(b"h"):
                        break
                    h = orjson.loads(v)
                    if isinstance(h, dict) and isinstance(h.get("v"), int) and isinstance(h.get("o"), dict):
                        heads.append((bytes(k[1:]), h))
            for u, h in heads:
                objs: dict[str, bytes] = {}
                for name, ver in h["o"].items():
                    data = txn.get(b"o" + u + K.SEP + name.encode() + K.SEP + _V.pack(int(ver)))
                    if data is not None:
                        objs[name] = bytes(data)
                futures: list[tuple[str, int, bytes]] = []
                pre = b"l" + u + K.SEP
                lc = txn.cursor()
                if lc.set_range(pre):
                    for k, v in lc:
                        if not k.startswith(pre):
                            break
                        fid = orjson.loads(v).get("f")
                        f = txn.get(b"f" + fid.encode()) if isinstance(fid, str) else None
                        if f is not None:
                            futures.append((fid, int(_V.unpack(k[-8:])[0]), bytes(f.partition(b"\n")[2])))
                out.append(OldUnit(u, int(h["v"]), objs, futures))
    finally:
        env.close()
    return out
