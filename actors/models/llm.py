"""``LLM``: the model actor. Subclass it, name an engine, and serve it on a node like any actor.

    class Writer(nalar.models.LLM):
        engine = "vllm:/models/llama-3.1-8b"      # or "sim:llama3-8b-a100", "openai:http://vllm:8000/v1"

Methods are ``async def``, so one instance runs many calls at once and they reach the engine
together, which batches them; the instance never serialises its callers. ``max_concurrency`` bounds
what one instance hands its engine: calls beyond it wait in the node's priority queue, where
policies can still reorder and move them. ``engine_stats()`` feeds the node's metrics, so policies
see running/waiting sequences and KV-cache use per instance.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..base import Model
from ..context import session as current_session
from ..hints import hints
from .api import Completion, Engine, SamplingParams, check_messages, check_prompt
from .spec import args_for, make_engine, spec_for


@hints(max_concurrency=256)
class LLM(Model):
    """A model instance wrapping one engine. ``generate`` and ``chat`` return a ``Completion`` dict."""

    engine: ClassVar[str] = "sim"
    engine_args: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._id = ""

    async def on_start(self) -> None:
        spec = spec_for(self.actor_name, self.engine)
        eng = make_engine(spec, args_for(self.engine_args))
        await eng.start()
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

    def engine_stats(self) -> dict[str, Any]:
        """Running/waiting sequences, KV use and prefix-cache hit rate, for the local controller."""
        return self._engine.stats().to_dict() if self._engine is not None else {}

    def _done(self, c: Completion) -> dict[str, Any]:
        c.instance = self._nalar_instance
        return c.to_dict()
