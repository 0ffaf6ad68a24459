"""The one interface every LLM engine keeps: sampling parameters in, a ``Completion`` out.

An engine is what a model actor (``nalar.models.LLM``) drives: vLLM in-process, an OpenAI-compatible
HTTP server, or the simulated continuous-batching engine. Keeping the interface this small is what lets
every workload run on every backend: workloads ask for an exact number of output tokens
(``ignore_eos``) so that a dummy-weight model, a real model and the simulation do the same work.
"""
from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, AsyncIterator, ClassVar


#: Upper bounds that keep one bad call from pinning an engine (documented in the README).
MAX_TOKENS_LIMIT = 32768
MAX_PROMPT_CHARS = 4 * 1024 * 1024


@dataclass(frozen=True)
class SamplingParams:
    """What a caller may ask of any engine (a subset of vLLM's ``SamplingParams`` and OpenAI's API)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: Generate exactly ``max_tokens`` (benchmarks: the same work on every backend).
    ignore_eos: bool = False

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any]) -> "SamplingParams":
        """Validate caller-supplied keyword arguments; unknown or ill-typed ones are a ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(kw) - known
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        mt = kw.get("max_tokens", cls.max_tokens)
        if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be an int in 1..{MAX_TOKENS_LIMIT}, not {mt!r}")
        t = kw.get("temperature", cls.temperature)
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 2:
            raise ValueError(f"temperature must be a number in 0..2, not {t!r}")
        p = kw.get("top_p", cls.top_p)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], not {p!r}")
        seed = kw.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or null, not {seed!r}")
        stop = kw.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 16:
            raise ValueError("stop must be a string or a list of at most 16 non-empty strings")
        ie = kw.get("ignore_eos", False)
        if not isinstance(ie, bool):
            raise ValueError(f"ignore_eos must be a bool, not {ie!r}")
        return cls(mt, float(t), float(p), seed, tuple(stop), ie)


@dataclass
class Completion:
    """One generation's result, as the model actor returns it (a JSON object)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "length" | "stop"
    engine: str  # e.g. "vllm", "openai", "simulated:llama3-8b-a100"; a simulation always says so
    instance: str = ""  # the model instance that served it (set by the actor)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (0 where the engine cannot say)
    ttft_ms: float = 0.0
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EngineStats:
    """What the local controller reports to the policy actor per model instance."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV-cache capacity in use, 0..1
    prefix_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens, since start
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"running": self.running, "waiting": self.waiting, "kv_usage": round(self.kv_usage, 4),
             "prefix_hit_rate": round(self.prefix_hit_rate, 4)}
        d.update(self.extra)
        return d


#: vLLM's scheduler limits (its ``AsyncEngineArgs`` names), which the simulated engine keeps as well.
SCHEDULER_ARGS = frozenset({"max_model_len", "max_num_seqs", "max_num_batched_tokens"})


class Engine(abc.ABC):
    """An LLM engine driven by one model instance. Concurrent ``generate`` calls must reach the
    engine together (it batches them); an engine never serialises its callers."""

    #: Shown in every ``Completion`` and in ``nalar status``.
    name: str = "engine"
    #: Options this engine honours, with the same meaning, when they were written for another kind
    #: (a class's ``engine_args`` after ``$NALAR_LLM`` switched its engine); see ``spec.py``.
    portable_args: ClassVar[frozenset[str]] = frozenset()

    async def start(self) -> None:
        """Load weights / open connections. Called once, on the node's event loop."""

    async def stop(self) -> None:
        """Release the engine. Called once when the instance stops."""

    @abc.abstractmethod
    async def generate(self, prompt: str, params: SamplingParams, session: str | None = None) -> Completion:
        """Generate a completion of ``prompt``. ``session`` lets an engine model its prefix cache."""

    async def stream(self, prompt: str, params: SamplingParams,
                     session: str | None = None) -> AsyncIterator[str | Completion]:
        """The text as it is generated (``str`` pieces), then the ``Completion`` (its whole text, tokens
        and timings). Closing the iterator early aborts the request. Default: all of it at once."""
        c = await self.generate(prompt, params, session)
        yield c.text
        yield c

    async def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams,
                          session: str | None = None) -> AsyncIterator[str | Completion]:
        """``chat``, streamed as ``stream`` is."""
        async for piece in self.stream(check_prompt(self.format_chat(messages)), params, session):
            yield piece

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams,
                   session: str | None = None) -> Completion:
        """Answer a chat: by default ``format_chat`` then ``generate``; an engine whose server applies
        the model's own template (OpenAI's ``/chat/completions``) overrides this."""
        return await self.generate(check_prompt(self.format_chat(messages)), params, session)

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """A chat as one prompt. Engines with a tokenizer chat template override this."""
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    def stats(self) -> EngineStats:
        """What the engine knows now, without waiting. Called on the engine's loop (the node's
        metrics, every round), so it must never block; ``LLM.engine_stats`` hops there from any
        other thread."""
        return EngineStats()

    async def fresh_stats(self) -> EngineStats:
        """``stats()``, first bringing a reading up to date where the engine must ask for one (a
        server's ``/metrics``): what a caller that asked once should see. On the engine's loop."""
        return self.stats()

    def kv_capacity_tokens(self) -> int | None:
        """Tokens the engine's KV cache holds, once started; ``None`` if it cannot tell (a remote
        server), and then its model actor does not budget admission."""
        return None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages are a list of ``{"role": ..., "content": str}``; anything else is a ``ValueError``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message must be {{'role': str, 'content': str}}, not {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, not {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt of {len(prompt)} characters is over the limit of {MAX_PROMPT_CHARS}")
    return prompt


def now_ms() -> float:
    return time.monotonic() * 1000.0
