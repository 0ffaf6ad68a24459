"""Placement: which node holds the latest version of each unit (session, actor).

Kept in a JetStream key-value bucket, ``nalar_<namespace>_placement`` (one key per unit, the value
is the node's name), because it must be right under races: a node *claims* a new unit with an atomic
create, and a migration *moves* it with a compare-and-set on the revision it read, only after the
destination holds the unit durably. Local mode uses an in-memory map with the same operations.
"""
from __future__ import annotations

import base64
from typing import Any, Protocol

from ..bus.errors import StateError
from . import keys as K


def kv_key(unit: bytes) -> str:
    return base64.urlsafe_b64encode(unit).decode().rstrip("=")


class Placement(Protocol):
    async def get(self, unit: bytes) -> tuple[str, int] | None: ...

    async def claim(self, unit: bytes, node: str) -> str:
        """Become the holder if there is none; return the holder (``node`` if the claim won)."""
        ...

    async def move(self, unit: bytes, src: str, dst: str) -> bool:
        """Set the holder to ``dst`` only if it is still ``src``."""
        ...


class LocalPlacement:
    def __init__(self) -> None:
        self._map: dict[bytes, tuple[str, int]] = {}

    async def get(self, unit: bytes) -> tuple[str, int] | None:
        return self._map.get(unit)

    async def claim(self, unit: bytes, node: str) -> str:
        held = self._map.setdefault(unit, (node, 1))
        return held[0]

    async def move(self, unit: bytes, src: str, dst: str) -> bool:
        cur = self._map.get(unit)
        if cur is not None and cur[0] != src:
            return False
        self._map[unit] = (dst, (cur[1] if cur else 0) + 1)
        return True


class KVPlacement:
    """Placement in a JetStream KV bucket."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, nc: Any, namespace: str) -> "KVPlacement":
        from nats.js.errors import BucketNotFoundError

        js = nc.jetstream()
        bucket = f"nalar_{namespace}_placement"
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            try:
                kv = await js.create_key_value(bucket=bucket, history=1, description="nalar: unit -> node")
            except Exception:  # another node created it at the same moment
                kv = await js.key_value(bucket)
        except Exception as e:
            raise StateError("StateError", f"placement needs JetStream on the NATS server ({e!r}); "
                                           "start nats-server with -js") from None
        return cls(kv)

    async def get(self, unit: bytes) -> tuple[str, int] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            e = await self.kv.get(kv_key(unit))
        except KeyNotFoundError:
            return None
        if e.value is None or e.operation in ("DEL", "PURGE"):
            return None
        return e.value.decode(), int(e.revision)

    async def claim(self, unit: bytes, node: str) -> str:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self.kv.create(kv_key(unit), node.encode())
            return node
        except KeyWrongLastSequenceError:
            cur = await self.get(unit)
            if cur is None:  # deleted in between: try once more
                await self.kv.create(kv_key(unit), node.encode())
                return node
            return cur[0]

    async def move(self, unit: bytes, src: str, dst: str) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        cur = await self.get(unit)
        if cur is None:
            try:
                await self.kv.create(kv_key(unit), dst.encode())
                return True
            except KeyWrongLastSequenceError:
                return False
        if cur[0] != src:
            return False
        try:
            await self.kv.update(kv_key(unit), dst.encode(), last=cur[1])
            return True
        except KeyWrongLastSequenceError:
            return False


__all__ = ["KVPlacement", "LocalPlacement", "Placement", "kv_key", "K"]
