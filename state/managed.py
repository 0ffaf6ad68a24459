"""Managed objects: session state that looks like local lists, dicts and values to an agent.

Inside a call of a ``stateful`` actor made with a session, ``nalar.managed_list("notes")`` returns the
unit's latest ``notes`` as a real ``list`` (a subclass). Change it any way you like, nested values
included; when the call returns, what changed is found by comparing each object's JSON with what was
loaded, and committed as the unit's next version (an append to a list records only the new items). If the call raises, nothing is committed. Values
must be JSON (orjson): anything else fails the call with a ``TypeError``.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

import orjson

from ..bus.errors import NalarError
from . import keys as K
from .record import EXTEND, SET, Change, appended
from .store import Store, empty_head

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class ManagedList(list):  # type: ignore[type-arg]
    """A ``list`` whose contents are session state."""


class ManagedDict(dict):  # type: ignore[type-arg]
    """A ``dict`` whose contents are session state."""


class ManagedValue:
    """One value (a number, a string, a JSON document) as session state: read ``.value``, assign to it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"ManagedValue({self.value!r})"


def _plain(obj: Any) -> Any:
    return obj.value if isinstance(obj, ManagedValue) else obj


def encode(obj: Any) -> bytes:
    try:
        return orjson.dumps(_plain(obj), option=_OPTS)
    except TypeError as e:
        raise TypeError(f"managed state must be JSON: {e}") from None


class Txn:
    """One call's view of its unit: objects load on first use; ``changes()`` finds what to commit.

    ``base`` is the unit's head when the call began: its commit is appended to the log only if the log
    is still at that head's sequence (else another node committed first and the call runs again).
    """

    __slots__ = ("store", "unit", "base", "loaded")

    def __init__(self, store: Store, unit: bytes) -> None:
        self.store = store
        self.unit = unit
        self.base = store.head(unit) or empty_head()
        self.loaded: dict[str, tuple[Any, bytes]] = {}

    def get(self, name: str, kind: type, make: Callable[[Any], Any], default: Any) -> Any:
        K.check_object_name(name)
        hit = self.loaded.get(name)
        if hit is not None:
            if not isinstance(hit[0], kind):
                raise TypeError(f"managed object {name!r} is a {type(hit[0]).__name__} in this call, not a {kind.__name__}")
            return hit[0]
        # the head this call began on says whether the object exists; its value is one read
        data = self.store.get(K.obj(self.unit, name)) if name in self.base["o"] else None
        value = orjson.loads(data) if data is not None else default
        try:
            obj = make(value)
        except (TypeError, ValueError):
            raise TypeError(f"managed object {name!r} holds a {type(value).__name__}, not what "
                            f"managed_{kind.__name__[7:].lower()} expects") from None
        # an untouched default is not a change: compare against the default's own encoding
        self.loaded[name] = (obj, data if data is not None else encode(obj))
        return obj

    def changes(self) -> list[tuple[Change, bytes]]:
        """What changed, each as the smallest change that says it (items appended to a list stay just
        those items) beside the object's new value in full."""
        out = []
        for name, (obj, original) in self.loaded.items():
            data = encode(obj)
            if data != original:
                items = appended(original, data) if isinstance(obj, list) else None
                out.append((Change(name, EXTEND, items) if items is not None else Change(name, SET, data), data))
        return out


#: The executing call's transaction (set by the node for stateful actors called with a session).
current_txn: ContextVar[Txn | None] = ContextVar("nalar_current_txn", default=None)


def _txn() -> Txn:
    t = current_txn.get()
    if t is None:
        raise NalarError("managed state exists only inside a call, made with a session "
                         "(stub.options(session=...)), to an actor hinted @nalar.hints(stateful=True)")
    return t


def _as_list(v: Any) -> ManagedList:
    if not isinstance(v, list):
        raise TypeError
    return ManagedList(v)


def _as_dict(v: Any) -> ManagedDict:
    if not isinstance(v, dict):
        raise TypeError
    return ManagedDict(v)


def managed_list(name: str) -> ManagedList:
    """This session's list ``name`` for this actor (empty at first)."""
    return _txn().get(name, ManagedList, _as_list, [])  # type: ignore[no-any-return]


def managed_dict(name: str) -> ManagedDict:
    """This session's dict ``name`` for this actor (empty at first)."""
    return _txn().get(name, ManagedDict, _as_dict, {})  # type: ignore[no-any-return]


def managed_value(name: str, default: Any = None) -> ManagedValue:
    """This session's value ``name`` for this actor (``default`` at first)."""
    return _txn().get(name, ManagedValue, ManagedValue, default)  # type: ignore[no-any-return]
