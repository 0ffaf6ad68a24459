"""Model actors: one interface (``LLM.generate`` / ``LLM.chat``) over vLLM, OpenAI-compatible servers
and a simulated continuous-batching engine. See ``llm.py`` and ``spec.py``.

Where things live:

    api.py            the interface every engine keeps: ``Engine``, ``SamplingParams``, ``Completion``
    llm.py            ``LLM``, the model actor: subclass it and name an engine
    spec.py           engine specs (``sim:``, ``vllm:``, ``openai:``) -> an engine, ``make_engine``
    vllm_engine.py    vLLM in-process, one ``AsyncLLM`` per model instance
    openai_engine.py  an OpenAI-compatible HTTP server (``vllm serve``) as an engine
    simulated.py      a simulated continuous-batching engine: vLLM's scheduling, time instead of a GPU
    profiles.py       the simulated engine's cost profiles (per step, per sequence, per context token)
    tiny.py           a tiny Llama model directory made locally (no weights, no download) for tests
    alias.py          ``nalar.models``: this package under its public name, as a module
"""
from .api import Completion, Engine, EngineStats, SamplingParams
from .llm import LLM
from .spec import make_engine

__all__ = ["Completion", "Engine", "EngineStats", "LLM", "SamplingParams", "make_engine"]
