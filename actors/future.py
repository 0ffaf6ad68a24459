"""The nalar ``Future``: a pykka ``Future`` that is resolved by a reply from the bus.

One lock for all futures (held for a few instructions) and a ``threading.Event`` made only when a
thread actually blocks keep a pending future at a few hundred bytes, so a process can hold 100k+ of
them. Values are pushed: the runtime resolves the future the moment its reply arrives and runs its
callbacks (consumers) right there.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Generic, Iterable, TypeVar

import pykka

from ..bus.errors import Cancelled, RemoteError, Timeout
from .future_state import DONE, FAILED, LOCK, PENDING
from .stream import Reader

T = TypeVar("T")
log = logging.getLogger("nalar.future")

_LOCK = LOCK
#: Threads that run a nalar event loop: blocking there would deadlock, so it is refused.
LOOP_THREADS: set[int] = set()


class Future(pykka.Future, Generic[T]):
    """A handle to the value of a call that may still be running somewhere else.

    ``result(timeout)`` (or pykka's ``get(timeout=...)``) blocks, ``await future`` suspends,
    ``available()`` polls. A future passed as an argument to another call is a dependency; a method
    that returns a future resolves its own caller's future to that future's value. A call to a
    streaming method is read with ``async for item in future``.
    """

    __slots__ = ("id", "actor", "method", "_state", "_value", "_callbacks", "_event", "_runtime",
                 "_span", "_wk", "_retry", "_items", "_get_hook", "_get_hook_result", "_svc")

    def __init__(self, id: str = "", actor: str = "", method: str = "", runtime: Any = None) -> None:
        self._get_hook = None
        self._get_hook_result = None
        self.id = id
        self.actor = actor
        self.method = method
        self._state = PENDING
        self._value: Any = None
        self._callbacks: list[Callable[["Future[T]"], None]] | None = None
        self._event: threading.Event | None = None
        self._runtime = runtime
        self._span: Any = None
        self._wk = 0  # the runtime's deadline-wheel key while armed
        self._retry: Any = None  # the runtime's retry state, for calls it may re-send
        self._items: Any = None  # a streaming call's items not read yet (``stream.Items``)
        self._svc: Any = None  # (calling scope, its program's service when sent): program-level scheduling

    def __repr__(self) -> str:
        state = ("pending", "done", "failed")[self._state]
        return f"<nalar.Future {self.id} {self.actor}.{self.method} {state}>"

    # -- reading --------------------------------------------------------------------------------
    def available(self) -> bool:
        """True once the future holds a value or an error (never blocks)."""
        return self._state != PENDING

    done = available

    def get(self, *, timeout: float | None = None) -> T:
        if self._get_hook is not None:  # pykka's set_get_hook() API: a value computed on first get()
            if self._get_hook_result is None:
                self._get_hook_result = (self._get_hook(timeout),)  # type: ignore[assignment]
            return self._get_hook_result[0]  # type: ignore[index,no-any-return]
        if self._state == PENDING:
            self._block(timeout)
        if self._state == DONE:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def result(self, timeout: float | None = None) -> T:
        """Wait at most ``timeout`` seconds (default: until the call's own deadline) for the value.

        Raises ``nalar.Timeout`` if the wait ran out (the call goes on), ``nalar.RemoteError`` (or a
        subclass) if the call failed.
        """
        return self.get(timeout=timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == PENDING:
            self._block(timeout)
        return self._value if self._state == FAILED else None

    def _block(self, timeout: float | None) -> None:
        if threading.get_ident() in LOOP_THREADS:
            raise RuntimeError(
                f"blocking on {self!r} inside nalar's event loop would deadlock it; "
                "use `await future` in async code"
            )
        with _LOCK:
            if self._state != PENDING:
                return
            if self._event is None:
                self._event = threading.Event()
            ev = self._event
        if not ev.wait(timeout):
            raise Timeout(f"{self.actor}.{self.method} did not finish within {timeout} s (it goes on)")

    def __await__(self) -> Any:
        if self._state == PENDING:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            tid = threading.get_ident()

            def wake(_: "Future[T]") -> None:
                if threading.get_ident() == tid:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    loop.call_soon_threadsafe(_set_none, waiter)

            self.add_done_callback(wake)
            yield from waiter.__await__()
        if self._get_hook is not None:
            return self.get()
        if self._state == DONE:
            return self._value
        raise self._value

    __iter__ = __await__

    def __aiter__(self) -> Any:
        """A streaming call's items as they arrive (``async for item in future``); then its error, if
        it failed. The future's value is the number of items. Each item is read once."""
        return Reader(self)

    # -- consumers ------------------------------------------------------------------------------
    def add_done_callback(self, fn: Callable[["Future[T]"], None]) -> None:
        """Run ``fn(future)`` when it completes (at once if it has), in the thread that completes it."""
        with _LOCK:
            if self._state == PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        fn(self)

    # -- writing --------------------------------------------------------------------------------
    def _finish(self, state: int, value: Any) -> bool:
        with _LOCK:
            if self._state != PENDING:
                return False
            self._state = state
            self._value = value
            callbacks, self._callbacks = self._callbacks, None
            ev = self._event
        if ev is not None:
            ev.set()
        if self._span is not None:
            _end_span(self._span, value if state == FAILED else None)
            self._span = None
        if callbacks:
            for fn in callbacks:
                try:
                    fn(self)
                except Exception:
                    log.exception("future callback failed")
        return True

    def set(self, value: T | None = None) -> None:
        if not self._finish(DONE, value):
            raise RuntimeError(f"{self!r} is already resolved")

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            import sys

            exc_info = sys.exc_info()
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if not self._finish(FAILED, exc):
            raise RuntimeError(f"{self!r} is already resolved")

    def cancel(self) -> bool:
        """Cancel the call and, through its executor, every call it made; False if already done."""
        if self._state != PENDING:
            return False
        if self._runtime is not None:
            return bool(self._runtime.cancel(self))
        return self._finish(FAILED, Cancelled("cancelled by caller", actor=self.actor, method=self.method,
                                              future_id=self.id))

    def cancelled(self) -> bool:
        return self._state == FAILED and isinstance(self._value, Cancelled)

    # -- pykka's combinators, driven by callbacks so the results are real nalar futures -----------
    def _derive(self, fn: Callable[[Any], Any]) -> "Future[Any]":
        out: Future[Any] = Future(f"{self.id}~", self.actor, self.method)

        def cb(f: "Future[Any]") -> None:
            if f._state == FAILED:
                out._finish(FAILED, f._value)
                return
            try:
                value = fn(f._value)
            except Exception as e:
                out._finish(FAILED, e)
            else:
                out._finish(DONE, value)

        self.add_done_callback(cb)
        return out

    def map(self, func: Callable[[Any], Any]) -> "Future[Any]":  # type: ignore[override]
        """A future of ``func(value)``."""
        return self._derive(func)

    def filter(self, func: Callable[[Any], bool]) -> "Future[Any]":  # type: ignore[override]
        """For an iterable value: a future of the items for which ``func`` is true."""
        return self._derive(lambda v: [x for x in v if func(x)])

    def reduce(self, func: Callable[[Any, Any], Any], *args: Any) -> "Future[Any]":  # type: ignore[override]
        """For an iterable value: a future of ``functools.reduce(func, value, *args)``."""
        import functools

        return self._derive(lambda v: functools.reduce(func, v, *args))

    def join(self, *futures: "Future[Any]") -> "Future[list[Any]]":  # type: ignore[override]
        """A future of ``[self's value, *their values]`` (like ``nalar.gather``)."""
        return gather(self, *futures)


def _set_none(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _end_span(span: Any, error: BaseException | None) -> None:
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, str(getattr(error, "message", error))[:200]))
    span.end()


def gather(*futures: Any) -> Future[list[Any]]:
    """One future for many: resolves to the list of values in order, or fails with the first error.

    Accepts futures and plain values, as arguments or as one iterable.
    """
    if len(futures) == 1 and not isinstance(futures[0], Future) and isinstance(futures[0], Iterable):
        futures = tuple(futures[0])
    out: Future[list[Any]] = Future("gather", "nalar", "gather")
    n = len(futures)
    values: list[Any] = [None] * n
    left = [sum(1 for f in futures if isinstance(f, Future))]
    if left[0] == 0:
        out._finish(DONE, list(futures))
        return out

    def one(i: int) -> Callable[[Future[Any]], None]:
        def cb(f: Future[Any]) -> None:
            if f._state == FAILED:
                out._finish(FAILED, f._value)
                return
            values[i] = f._value
            with _LOCK:
                left[0] -= 1
                last = left[0] == 0
            if last:
                out._finish(DONE, values)
        return cb

    for i, f in enumerate(futures):
        if isinstance(f, Future):
            f.add_done_callback(one(i))
        else:
            values[i] = f
    return out


ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"


def wait(futures: Iterable[Future[Any]], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> tuple[set[Future[Any]], set[Future[Any]]]:
    """Block until the condition holds or ``timeout`` passes; return ``(done, not_done)``.

    Like ``concurrent.futures.wait``; from async code use ``await nalar.gather(...)`` instead.
    """
    fs = set(futures)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError("return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION")
    if threading.get_ident() in LOOP_THREADS:
        raise RuntimeError("nalar.wait blocks; inside nalar's event loop use `await nalar.gather(...)`")
    ev = threading.Event()
    left = [len(fs)]

    def cb(f: Future[Any]) -> None:
        with _LOCK:
            left[0] -= 1
            n = left[0]
        if n == 0 or return_when == FIRST_COMPLETED or (return_when == FIRST_EXCEPTION and f._state == FAILED):
            ev.set()

    if not fs:
        return set(), set()
    for f in fs:
        f.add_done_callback(cb)
    ev.wait(timeout)
    done = {f for f in fs if f._state != PENDING}
    return done, fs - done


__all__ = ["Future", "gather", "wait", "RemoteError", "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"]
