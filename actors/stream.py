"""The items of a streaming call, as its caller reads them: ``async for item in future``.

A streaming method (an ``async def`` that ``yield``s) sends each item on the call's reply subject as
it is made, numbered from 0, and then its value: how many it sent. The runtime keeps the items that
have arrived here, in order, with duplicates (a retry's second reply subject) dropped and a gap
(items NATS dropped for a slow consumer) failing the call, so a caller never reads a stream with a
hole in it. The items are read once; one reader at a time.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from .future_state import DONE, LOCK, PENDING


class Items:
    """The items that have arrived and not been read, the number expected next, the reader's wake-up,
    and whether a reader has asked to be woken when the call ends (``reading``)."""

    __slots__ = ("buf", "next", "waker", "reading", "stream")

    def __init__(self) -> None:
        self.buf: deque[Any] = deque()
        self.next = 0
        self.stream = False  # an item or a stream's end arrived: the call is a streaming one
        self.waker: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int] | None = None
        self.reading = False

    def wake(self) -> None:
        """Wake the reader, from any thread (called with the futures' lock not held)."""
        w, self.waker = self.waker, None
        if w is None:
            return
        loop, waiter, tid = w
        if threading.get_ident() == tid:
            if not waiter.done():
                waiter.set_result(None)
        else:
            loop.call_soon_threadsafe(_set_none, waiter)


def _set_none(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Reader:
    """``async for item in future``: each item of its stream as it arrives, then the call's error if
    it failed. Leaving the loop early and reading again later goes on where it stopped; two readers
    waiting at once is an error."""

    __slots__ = ("fut", "items")

    def __init__(self, fut: Any) -> None:  # a nalar Future (which imports this module)
        self.fut = fut
        with LOCK:
            if fut._items is None:
                fut._items = Items()
            self.items: Items = fut._items

    def __aiter__(self) -> "Reader":
        return self

    async def __anext__(self) -> Any:
        fut, items = self.fut, self.items
        loop = asyncio.get_running_loop()
        while True:
            with LOCK:
                if items.buf:
                    return items.buf.popleft()
                if fut._state != PENDING:
                    break
                if items.waker is not None:
                    raise RuntimeError(f"{fut!r} is already being read: a stream has one reader at a time")
                waiter: asyncio.Future[None] = loop.create_future()
                items.waker = (loop, waiter, threading.get_ident())
                first = not items.reading
                items.reading = True
            if first:  # the call's end wakes the reader too
                fut.add_done_callback(lambda _f: items.wake())
            try:
                await waiter
            finally:
                if items.waker is not None and items.waker[1] is waiter:
                    items.waker = None
        if fut._state != DONE:
            raise fut._value
        if not items.stream:
            raise TypeError(f"{fut.actor}.{fut.method} is not a streaming method (it does not yield): "
                            "await its future for its value")
        raise StopAsyncIteration
