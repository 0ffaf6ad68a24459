"""``LLM``: the model actor. Subclass it, name an engine, and serve it on a node like any actor.

    class Writer(nalar.models.LLM):
        engine = "vllm:/models/llama-3.1-8b"      # or "sim:llama3-8b-a100", "openai:http://vllm:8000/v1"
        engine_args = {"max_model_len": 8192}     # for that engine; see ``spec.engine_args_for``

Methods are ``async def``, so one instance runs many calls at once and they reach the engine
together, which batches them; the instance never serialises its callers. ``max_concurrency`` bounds
what one instance hands its engine: calls beyond it wait in the node's priority queue, where
policies can still reorder and move them. ``engine_stats()`` feeds the node's metrics, so policies
see running/waiting sequences and KV-cache use per instance.

Admission: the node also holds back calls once those running would reserve more than ``kv_budget`` of
the engine's KV cache (prompt + ``max_tokens`` each, estimated from characters). An engine handed
everything at once evicts the cached prefixes of sessions between their turns, and every returning
session then prefills its whole conversation again, stalling the batch: throughput falls exactly
when load is highest. Held calls wait in the node's queue, in priority order, instead of in the
engine's first-come queue. ``kv_budget = None`` turns it off; engines that do not report their KV
capacity (an OpenAI-compatible server) are not budgeted.

Streaming: ``generate_stream`` and ``chat_stream`` yield the text as the engine makes it (``str``
pieces), then one dict, the completion without its text; a caller reads them with ``async for``.
Cancelling the call (or a caller that goes away) closes the stream, which aborts the engine's request.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, ClassVar

from ..base import Model
from ..context import session as current_session
from ..hints import hints
from .api import Completion, Engine, SamplingParams, check_messages, check_prompt
from .spec import engine_args_for, make_engine, spec_for

#: How long ``engine_stats`` called off the engine's loop waits for it (a /metrics read included).
STATS_WAIT_S = 5.0


@hints(max_concurrency=256)
class LLM(Model):
    """A model instance wrapping one engine. ``generate`` and ``chat`` return a ``Completion`` dict."""

    engine: ClassVar[str] = "sim"
    engine_args: ClassVar[dict[str, Any]] = {}
    #: Share of the engine's KV cache that the calls running at once may reserve; the rest keeps
    #: sessions' prefixes between their turns. Chosen from sweeps of the analyst workload (simulated
    #: A100): 0.25-0.4 hold the prefix-hit rate at 6-8 sessions/s where 0.6 and no budget collapse it;
    #: 0.3 did best at 5-7 sessions/s, 0.25 at 8.
    kv_budget: ClassVar[float | None] = 0.3
    #: Characters per token of the estimate (the engine's own count comes only after admission).
    chars_per_token: ClassVar[float] = 4.0

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the engine's: the node's, where it started
        self._id = ""

    async def on_start(self) -> None:
        spec = spec_for(self.actor_name, self.engine)
        eng = make_engine(spec, engine_args_for(self.actor_name, self.engine, spec, self.engine_args))
        await eng.start()
        self._loop = asyncio.get_running_loop()
        self._engine = eng

    async def on_stop(self) -> None:
        eng, self._engine = self._engine, None
        if eng is not None:
            await eng.stop()

    def _eng(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.actor_name}: the engine is not started (on_start failed or stopped)")
        return self._engine

    async def generate(self, prompt: str, **params: Any) -> dict[str, Any]:
        """Complete ``prompt``. ``params``: max_tokens, temperature, top_p, seed, stop, ignore_eos."""
        c = await self._eng().generate(check_prompt(prompt), SamplingParams.from_kwargs(params), current_session())
        return self._done(c)

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """Answer a chat (a list of ``{"role", "content"}``), formatted with the engine's template."""
        c = await self._eng().chat(check_messages(messages), SamplingParams.from_kwargs(params), current_session())
        return self._done(c)

    async def generate_stream(self, prompt: str, **params: Any) -> AsyncIterator[str | dict[str, Any]]:
        """``generate``, streamed: the text's pieces as they come, then the completion (without its text)."""
        pieces = self._eng().stream(check_prompt(prompt), SamplingParams.from_kwargs(params), current_session())
        async for piece in self._streamed(pieces):
            yield piece

    async def chat_stream(self, messages: list[dict[str, str]], **params: Any) -> AsyncIterator[str | dict[str, Any]]:
        """``chat``, streamed as ``generate_stream`` is."""
        pieces = self._eng().stream_chat(check_messages(messages), SamplingParams.from_kwargs(params),
                                         current_session())
        async for piece in self._streamed(pieces):
            yield piece

    async def _streamed(self, pieces: AsyncIterator[str | Completion]) -> AsyncIterator[str | dict[str, Any]]:
        try:
            async for piece in pieces:
                if isinstance(piece, Completion):
                    done = self._done(piece)
                    done.pop("text", None)
                    yield done
                elif piece:
                    yield piece
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]  # an engine's stream left early aborts its request

    def admission_cost(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> int:
        """KV tokens a call will hold at most: its prompt (estimated) and ``max_tokens``."""
        prompt: Any = kwargs.get("prompt", kwargs.get("messages", args[0] if args else ""))
        if isinstance(prompt, list):
            chars = sum(len(m.get("content", "")) + 16 for m in prompt if isinstance(m, dict))
        else:
            chars = len(prompt) if isinstance(prompt, str) else 0
        mt = kwargs.get("max_tokens", SamplingParams.max_tokens)
        return int(chars / self.chars_per_token) + (mt if isinstance(mt, int) and mt > 0 else 0)

    def admission_budget(self) -> int | None:
        """KV tokens the running calls may hold together (``kv_budget`` of the engine's cache)."""
        cap = self._engine.kv_capacity_tokens() if self._engine is not None else None
        if not cap or not self.kv_budget:
            return None
        return int(cap * self.kv_budget)

    def engine_stats(self) -> dict[str, Any]:
        """Running/waiting sequences, KV use and prefix-cache hit rate, for the local controller.

        Always gathered on the engine's loop: an engine's state (and an OpenAI engine's reads of its
        server's ``/metrics``) belong to it, but as a ``def`` this runs on the instance's own thread
        when a caller asks. The node's metrics call it on the loop, and get what the engine has now
        without a wait; from any other thread it hops to the loop and waits for ``fresh_stats()``.
        """
        eng, loop = self._engine, self._loop
        if eng is None:
            return {}
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is not None or loop.is_closed():
            return eng.stats().to_dict()  # on a loop (the engine's, every metrics round): never wait
        fut = asyncio.run_coroutine_threadsafe(eng.fresh_stats(), loop)
        try:
            return fut.result(STATS_WAIT_S).to_dict()
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{self.actor_name}: the engine's loop gave no stats within {STATS_WAIT_S} s") from None

    def _done(self, c: Completion) -> dict[str, Any]:
        c.instance = self._nalar_instance
        return c.to_dict()
