"""``Agent``, ``Tool`` and ``Model``: plain Python classes whose public methods become remote methods.

An actor's name (what stubs and ``nalar call`` use) is its class attribute ``actor_name``, by default
the class name. Public methods are those not starting with ``_``; ``def`` methods run one at a time on
the instance's own thread (a pykka actor), ``async def`` methods on the node's event loop. An
``async def`` method that ``yield``s is a streaming method: its caller gets each item as it is made
(``async for item in future``), and the future's value is the number of items.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..bus.subjects import check_token

_LIFECYCLE = {"on_start", "on_stop"}


class Actor:
    """Base of every actor. Override ``on_start``/``on_stop`` for set-up and tear-down."""

    actor_name: ClassVar[str] = ""
    kind: ClassVar[str] = "actor"
    _nalar_instance: str = ""  # set by the hosting node: this instance's id

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "actor_name" not in cls.__dict__:
            cls.actor_name = cls.__name__
        check_token(cls.actor_name, "actor name")

    def on_start(self) -> Any:
        """Called once in the hosting node before the first call (may be ``async def``)."""

    def on_stop(self) -> Any:
        """Called once when the hosting node stops (may be ``async def``)."""


class Agent(Actor):
    """An agent: orchestrates other actors, usually per session."""

    kind = "agent"


class Tool(Actor):
    """A tool: a function-like service (search, retrieval, code execution)."""

    kind = "tool"


class Model(Actor):
    """A model: wraps an LLM engine (vLLM, an OpenAI-compatible server, a simulation)."""

    kind = "model"


@runtime_checkable
class Budgeted(Protocol):
    """An actor whose calls hold a share of something finite while they run (a model's KV cache): the
    node starts a call only while the running ones' costs fit the budget (a call alone always starts)."""

    def admission_cost(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> int:
        """What this call would hold while it runs (a model: its prompt and output tokens)."""
        ...

    def admission_budget(self) -> int | None:
        """What the instance can hold at once; ``None``: no limit now."""
        ...


@runtime_checkable
class ReportsEngineStats(Protocol):
    """An actor with an engine whose stats (running, waiting, KV use) go into status and metrics."""

    def engine_stats(self) -> dict[str, Any]: ...


async def run_hook(fn: Any) -> None:
    """Run ``on_start``/``on_stop``: ``async def`` on the node's loop (engines that need it, such as an
    async LLM engine), plain ``def`` on a worker thread so a slow set-up does not stall the loop."""
    if inspect.iscoroutinefunction(fn):
        await fn()
    else:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, fn)


def actor_name(target: Any) -> str:
    if isinstance(target, str):
        return check_token(target, "actor name")
    if isinstance(target, type):
        return str(getattr(target, "actor_name", "") or target.__name__)
    raise TypeError(f"an actor is named by a string or an actor class, not {type(target).__name__}")


def public_methods(cls: type) -> dict[str, bool]:
    """Public method name -> whether it is ``async def`` (a streaming ``async def`` with ``yield`` too)."""
    out: dict[str, bool] = {}
    for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
        if name.startswith("_") or name in _LIFECYCLE:
            continue
        out[name] = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    return out


def streaming_methods(cls: type) -> frozenset[str]:
    """The public methods that are async generators: each item they yield is sent as it comes."""
    return frozenset(name for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction)
                     if not name.startswith("_") and inspect.isasyncgenfunction(fn))
