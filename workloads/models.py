"""The model actors of the reference workloads: one class per model pool.

Each class is one deployment of a (fine-tuned, in the paper) Llama-3-8B; an instance stands for one
GPU. Separate classes are separate pools, so the policies can balance, reassign and route them
independently. The engine defaults to the simulated A100 (``sim:llama3-8b-a100``); ``$NALAR_LLM`` or
``$NALAR_LLM_<ACTOR>`` switches every workload to vLLM or an OpenAI-compatible server unchanged, and
``$NALAR_LLM_ARGS`` passes engine options (``{"speed": 50}`` runs the simulation 50x faster in tests).
Workloads always ask for exact output lengths (``ignore_eos=True``), so every backend does the same
work whatever text comes back. The default ``max_concurrency`` of ``LLM`` (what one instance hands its
engine at once) is kept.
"""
from __future__ import annotations

from typing import Any

import nalar

#: The profile the paper's testbed corresponds to (A100-80GB, Llama-3-8B on vLLM).
ENGINE = "sim:llama3-8b-a100"


class AnalystLLM(nalar.models.LLM):
    """The financial analyst's one shared pool: specialists and the summariser all use it.

    Left at the engine's own limit (256 sequences). Under nalar the node still holds calls back once
    those running would reserve ``kv_budget`` of the KV cache, keeping room for the conversations
    (prefixes) of sessions between turns; under the baseline every call goes straight to the engine,
    whose first-come queue and cache do the rest, as in frameworks without a scheduler."""

    engine = ENGINE


class ClassifierLLM(nalar.models.LLM):
    """The router's light classifier (short outputs): a 1B model."""

    engine = "sim:llama3-1b-a100"


class ChatLLM(nalar.models.LLM):
    """The router's chat branch (the hot branch under the default skew)."""

    engine = ENGINE


class CoderLLM(nalar.models.LLM):
    """The router's coding branch."""

    engine = ENGINE


@nalar.hints(max_concurrency=8)
class SweLLM(nalar.models.LLM):
    """The software company's pool: product manager, architect, engineers and QA share it.

    An instance hands its engine at most 8 calls at once (a latency-bound deployment: each call
    decodes at close to single-sequence speed); further calls wait in the node's priority queue, where
    the scheduler, not the engine's FCFS, decides which project's call goes next. Both configurations
    of ``nalar bench swe`` have the same limit."""

    engine = ENGINE


def usage(out: dict[str, Any]) -> dict[str, Any]:
    """What a workload's result keeps of one LLM call (its accounting, not its text)."""
    return {k: out.get(k) for k in ("instance", "prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms")}
