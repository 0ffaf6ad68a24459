"""Engine specs: one string says which engine a model actor drives.

==========================  ==================================================================
``sim`` / ``sim:PROFILE``   the simulated continuous-batching engine (``simulated.py``)
``vllm:MODEL``              vLLM in-process (``AsyncLLM``); MODEL is a local path or a name
``openai:URL``              an OpenAI-compatible server, e.g. ``openai:http://vllm:8000/v1``
==========================  ==================================================================

A model class names its engine in ``engine``; ``$NALAR_LLM_<ACTOR>`` (the actor name upper-cased) or
``$NALAR_LLM`` overrides it, so one workload runs on every backend without code changes. Engine
options come from the class's ``engine_args`` and ``$NALAR_LLM_ARGS`` (a JSON object), the latter
winning.

The class's ``engine_args`` are written for the engine the class names. Where the environment switches
it to another kind (a ``vllm:`` class run with ``NALAR_LLM=sim``), the new engine takes only those it
honours the same way (``portable_args``: vLLM's scheduler limits, which the simulation keeps too) and
the rest are dropped with a warning, so the switch needs no code change; to the engine they were
written for, and from ``$NALAR_LLM_ARGS`` (written for the engine in force), an unknown option is
still an error.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import orjson

from .api import Engine

log = logging.getLogger("nalar.models")


def spec_for(actor: str, default: str) -> str:
    return os.environ.get(f"NALAR_LLM_{actor.upper()}") or os.environ.get("NALAR_LLM") or default


def env_args() -> dict[str, Any]:
    """``$NALAR_LLM_ARGS``, a JSON object (empty when unset)."""
    raw = os.environ.get("NALAR_LLM_ARGS")
    if not raw:
        return {}
    try:
        extra = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"$NALAR_LLM_ARGS is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError("$NALAR_LLM_ARGS must be a JSON object")
    return extra


def engine_args_for(actor: str, declared: str, spec: str, class_args: dict[str, Any]) -> dict[str, Any]:
    """The options for engine ``spec`` of a class that declared ``declared`` with ``class_args``."""
    kind = spec.partition(":")[0]
    out = dict(class_args)
    if kind != declared.partition(":")[0] and out:
        portable = engine_class(kind).portable_args
        dropped = sorted(k for k in out if k not in portable)
        if dropped:
            log.warning("%s: engine %s ignores engine_args written for %s: %s", actor, kind,
                        declared.partition(":")[0], ", ".join(dropped))
        out = {k: v for k, v in out.items() if k in portable}
    out.update(env_args())
    return out


def engine_class(kind: str) -> type[Engine]:
    """The class behind an engine kind; heavy imports happen only in its ``start``."""
    if kind == "sim":
        from .simulated import SimEngine

        return SimEngine
    if kind == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine
    if kind == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine
    raise ValueError(f"unknown engine kind {kind!r}: use sim[:PROFILE], vllm:MODEL or openai:URL")


def make_engine(spec: str, args: dict[str, Any]) -> Engine:
    """Build (not start) the engine ``spec`` names. Heavy imports happen only for the chosen kind."""
    kind, _, target = spec.partition(":")
    if kind == "sim":
        from .simulated import SimEngine

        return SimEngine(target or "llama3-8b-a100", **args)
    if kind == "vllm":
        if not target:
            raise ValueError("vllm: needs a model, e.g. vllm:/models/tiny or vllm:meta-llama/Llama-3.1-8B")
        from .vllm_engine import VllmEngine

        return VllmEngine(target, **args)
    if kind == "openai":
        if not target.startswith(("http://", "https://")):
            raise ValueError("openai: needs a base URL, e.g. openai:http://vllm:8000/v1")
        from .openai_engine import OpenAIEngine

        return OpenAIEngine(target, **args)
    raise ValueError(f"unknown engine {spec!r}: use sim[:PROFILE], vllm:MODEL or openai:URL")
