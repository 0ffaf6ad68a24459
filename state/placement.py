"""Placement: which node holds the latest version of each unit (session, actor).

Kept in a JetStream key-value bucket, ``nalar_<namespace>_placement`` (``bus.kv.placement_bucket``; one
key per unit), because it must be right under races. The value is the holder's name, or
``holder>destination`` while a move is under way. A node *claims* a new unit with an atomic create. A
move is fenced by compare-and-set: the holder marks ``src>dst`` before sending; the destination, once it
holds the copy durably, swaps ``src>dst`` for ``dst``; a holder whose move timed out swaps ``src>dst``
back to ``src``. Whichever swap lands first wins and the other side undoes its part. Local mode keeps
the same map in memory.
"""
from __future__ import annotations

import base64
from typing import Any, Protocol

from ..bus import kv as bkv
from ..bus.errors import BusError, StateError
from . import keys as K


def kv_key(unit: bytes) -> str:
    return base64.urlsafe_b64encode(unit).decode().rstrip("=")


def holder(value: str) -> str:
    """The node that holds the unit now (``a>b``: a move from a to b is under way; a still holds it)."""
    return value.partition(">")[0]


class Placement(Protocol):
    async def get(self, unit: bytes) -> tuple[str, int] | None:
        """The raw value (``node`` or ``src>dst``) and its revision, or None."""
        ...

    async def claim(self, unit: bytes, node: str) -> str:
        """Become the holder if there is none; return the current value (``node`` if the claim won)."""
        ...

    async def swap(self, unit: bytes, expect: str, new: str) -> bool:
        """Set the value to ``new`` only if it is ``expect`` (compare-and-set)."""
        ...


class LocalPlacement:
    def __init__(self) -> None:
        self._map: dict[bytes, tuple[str, int]] = {}

    async def get(self, unit: bytes) -> tuple[str, int] | None:
        return self._map.get(unit)

    async def claim(self, unit: bytes, node: str) -> str:
        held = self._map.setdefault(unit, (node, 1))
        return held[0]

    async def swap(self, unit: bytes, expect: str, new: str) -> bool:
        cur = self._map.get(unit)
        if cur is None or cur[0] != expect:
            return False
        self._map[unit] = (new, cur[1] + 1)
        return True


class KVPlacement:
    """Placement in a JetStream KV bucket."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: Any, namespace: str) -> "KVPlacement":
        """Open (or create) the namespace's bucket; ``js`` is a JetStream context (``Transport.jetstream()``)."""
        try:
            kv = await bkv.open_bucket(js, bkv.placement_bucket(namespace), "placement")
        except BusError as e:
            raise StateError(str(e)) from None
        return cls(kv)

    async def get(self, unit: bytes) -> tuple[str, int] | None:
        got = await bkv.get(self.kv, kv_key(unit))
        return None if got is None else (got[0].decode(), got[1])

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

    async def swap(self, unit: bytes, expect: str, new: str) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        cur = await self.get(unit)
        if cur is None or cur[0] != expect:
            return False
        try:
            await self.kv.update(kv_key(unit), new.encode(), last=cur[1])
            return True
        except KeyWrongLastSequenceError:
            return False


__all__ = ["KVPlacement", "LocalPlacement", "Placement", "holder", "kv_key", "K"]
