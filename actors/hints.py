"""Hints: what an actor class tells the runtime about itself.

Recorded on the class by ``@nalar.hints(...)`` and exposed in ``nalar status``. Enforced today:
``max_concurrency`` (per instance), ``min_instances``/``max_instances`` (per node, when it starts).
``stateful``, ``batchable``, ``preemptable`` and ``resources`` are recorded for the state and control
layers, which build on them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, TypeVar

#: Per-instance concurrency when a class has ``async def`` methods and sets no ``max_concurrency``.
DEFAULT_ASYNC_CONCURRENCY = 64
_BY_KIND = -1


@dataclass(frozen=True)
class Hints:
    stateful: bool = False
    batchable: bool = False
    preemptable: bool | str = False
    min_instances: int = 1
    max_instances: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    #: Calls one instance runs at once. Sync-only classes: always 1 (a pykka actor). Classes with
    #: ``async def`` methods: this many (default 64); ``None`` means no limit.
    max_concurrency: int | None = _BY_KIND

    def concurrency_for(self, has_async: bool) -> int | None:
        if not has_async:
            return 1
        if self.max_concurrency == _BY_KIND:
            return DEFAULT_ASYNC_CONCURRENCY
        return self.max_concurrency

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["max_concurrency"] == _BY_KIND:
            d["max_concurrency"] = "default"
        return d


_NAMES = {f.name for f in fields(Hints)}
C = TypeVar("C", bound=type)


def _check(h: Hints) -> None:
    if not isinstance(h.min_instances, int) or h.min_instances < 0:
        raise ValueError("min_instances must be an int >= 0")
    if h.max_instances is not None and (not isinstance(h.max_instances, int) or h.max_instances < max(1, h.min_instances)):
        raise ValueError("max_instances must be an int >= max(1, min_instances), or None")
    mc = h.max_concurrency
    if mc is not None and mc != _BY_KIND and (not isinstance(mc, int) or mc < 1):
        raise ValueError("max_concurrency must be an int >= 1, or None for no limit")
    if not isinstance(h.resources, dict) or not all(isinstance(v, (int, float)) for v in h.resources.values()):
        raise ValueError("resources must map a resource name to a number, e.g. {'gpu': 1}")


def hints(**kwargs: Any) -> Callable[[C], C]:
    """Class decorator: ``@nalar.hints(stateful=True, max_instances=4)``."""
    unknown = set(kwargs) - _NAMES
    if unknown:
        raise TypeError(f"unknown hint(s) {sorted(unknown)}; known hints: {sorted(_NAMES)}")

    def apply(cls: C) -> C:
        h = replace(hints_of(cls), **kwargs)
        _check(h)
        cls.__nalar_hints__ = h  # type: ignore[attr-defined]
        return cls

    return apply


def hints_of(cls: type) -> Hints:
    h = getattr(cls, "__nalar_hints__", None)
    return h if isinstance(h, Hints) else Hints()
