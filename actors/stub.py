"""Stubs: attribute access gives a remote method; calling it returns a ``Future`` at once.

``nalar.stub("llm")`` names an actor; ``nalar.stub(Research)`` also knows its methods, so a typo is an
``AttributeError`` at the call site. A stub without a runtime uses the process's current one (the
node's inside an actor, the client's, or local mode's), so stubs work as class attributes.
"""
from __future__ import annotations

from typing import Any

from .base import actor_name, public_methods
from .future import Future
from .retry import RetryPolicy
from .runtime import _INHERIT, Runtime, check_key, check_timeout, current_runtime


class Stub:
    __slots__ = ("_actor", "_methods", "_runtime", "_session", "_timeout", "_priority", "_retry", "_key")

    def __init__(self, target: Any, runtime: Runtime | None = None, *, session: Any = _INHERIT,
                 timeout: float | None = None, priority: int | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self._actor = actor_name(target)
        self._methods = frozenset(public_methods(target)) if isinstance(target, type) else None
        self._runtime = runtime
        self._session = session
        self._timeout = check_timeout(timeout) if timeout is not None else None
        self._priority = priority
        self._retry = retry
        self._key: str | None = None

    def options(self, *, session: Any = _INHERIT, timeout: float | None = None,
                priority: int | None = None, retry: RetryPolicy | None = None, key: str | None = None) -> "Stub":
        """A copy with call options: ``session`` id, ``timeout`` in seconds (the deadline), ``priority``,
        ``retry`` (a ``nalar.RetryPolicy``; ``nalar.NO_RETRY`` to never re-send), ``key``.

        ``key`` is the call's future id, so a retry from a new process after a crash, or after an
        ``Unavailable`` whose outcome is unknown, is the same call to the executor: answered once
        (while it runs, and from its commit for a stateful actor) rather than applied again. Use a
        fresh key per logical call (a uuid, or the ``future_id`` an error names)."""
        s = Stub.__new__(Stub)
        s._actor, s._methods, s._runtime = self._actor, self._methods, self._runtime
        s._session = self._session if session is _INHERIT else session
        s._timeout = self._timeout if timeout is None else check_timeout(timeout)
        s._priority = self._priority if priority is None else priority
        s._retry = self._retry if retry is None else retry
        s._key = self._key if key is None else check_key(key)
        return s

    def __getattr__(self, name: str) -> "RemoteMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        if self._methods is not None and name not in self._methods:
            raise AttributeError(f"actor {self._actor!r} has no method {name!r}; it has {sorted(self._methods)}")
        return RemoteMethod(self, name)

    def __repr__(self) -> str:
        return f"<nalar.Stub {self._actor}>"


class RemoteMethod:
    __slots__ = ("_stub", "_name")

    def __init__(self, stub: Stub, name: str) -> None:
        self._stub = stub
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Future[Any]:
        s = self._stub
        rt = s._runtime or current_runtime()
        return rt.call(s._actor, self._name, args, kwargs, s._session, s._timeout, s._priority, s._retry, s._key)


def stub(target: Any, *, session: Any = _INHERIT, timeout: float | None = None,
         priority: int | None = None, retry: RetryPolicy | None = None) -> Stub:
    """A stub for an actor named by string or class, bound to the current runtime when called."""
    return Stub(target, None, session=session, timeout=timeout, priority=priority, retry=retry)
