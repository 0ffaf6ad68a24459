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
"""
from __future__ import annotations

import os
from typing import Any

import orjson

from .api import Engine


def spec_for(actor: str, default: str) -> str:
    return os.environ.get(f"NALAR_LLM_{actor.upper()}") or os.environ.get("NALAR_LLM") or default


def args_for(defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    raw = os.environ.get("NALAR_LLM_ARGS")
    if raw:
        try:
            extra = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"$NALAR_LLM_ARGS is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("$NALAR_LLM_ARGS must be a JSON object")
        out.update(extra)
    return out


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
