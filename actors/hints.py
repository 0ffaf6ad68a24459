"""Hints: what an actor class tells the runtime about itself.

Recorded on the class by ``@nalar.hints(...)`` and exposed in ``nalar status``. Enforced:
``max_concurrency`` (per instance), ``min_instances``/``max_instances`` (per node, when it starts),
``stateful`` (session state), ``batchable`` with ``max_batch_size`` and ``max_batch_wait_ms`` (the node
gathers calls into one invocation: ``actors/node/batch.py``), ``preemptable`` (a running call gives
its instance up to a waiting one of higher priority: ``actors/preempt.py``), ``resources`` (what
one instance takes of its node's declared resources: start and ``provision`` place instances only
where they fit, ``actors/node/resources.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, TypeVar

#: Per-instance concurrency when a class has ``async def`` methods and sets no ``max_concurrency``.
DEFAULT_ASYNC_CONCURRENCY = 64
_BY_KIND = -1


@dataclass(frozen=True)
class Hints:
    stateful: bool = False
    #: True: every public method is batched; a name or a list of names: those methods.
    batchable: bool | str | tuple[str, ...] | list[str] = False
    #: A batch runs once it holds this many calls...
    max_batch_size: int = 32
    #: ...or once its first call has waited this long (milliseconds) since it arrived.
    max_batch_wait_ms: float = 2.0
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
    if not isinstance(h.resources, dict):
        raise ValueError("resources must map a resource name to an amount, e.g. {'gpu': 1, 'memory': '8GiB'}")
    from .resources import check_amounts

    check_amounts(h.resources, "resources")  # (sizes as text, '8GiB', are read when a node takes them)
    b = h.batchable
    if not (isinstance(b, (bool, str)) or (isinstance(b, (list, tuple)) and all(isinstance(x, str) for x in b))):
        raise ValueError("batchable must be True, a method name or a list of method names")
    if not isinstance(h.preemptable, (bool, str)):
        raise ValueError("preemptable must be True (async methods are cancelled) or the name of the actor's "
                         "method the node calls to ask a running def method to give its instance up")
    if b and h.stateful:
        raise ValueError("an actor cannot be both stateful and batchable: one invocation for many sessions' "
                         "calls has no one session state to change (take batchable off, or the state)")
    if not isinstance(h.max_batch_size, int) or isinstance(h.max_batch_size, bool) or h.max_batch_size < 1:
        raise ValueError("max_batch_size must be an int >= 1")
    w = h.max_batch_wait_ms
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 10_000:
        raise ValueError("max_batch_wait_ms must be a number of milliseconds from 0 to 10000")


def batched_methods(h: Hints, methods: Iterable[str]) -> frozenset[str]:
    """The methods whose calls are batched (``batchable``), checked against the class's own methods."""
    have = set(methods)
    b = h.batchable
    if b is True:
        return frozenset(have)
    if not b:
        return frozenset()
    names = {b} if isinstance(b, str) else set(b)
    missing = names - have
    if missing:
        raise ValueError(f"batchable names {sorted(missing)}, which are not public methods (it has {sorted(have)})")
    return frozenset(names)


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
