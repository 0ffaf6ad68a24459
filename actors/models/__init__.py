"""Model actors: one interface (``LLM.generate`` / ``LLM.chat``) over vLLM, OpenAI-compatible servers
and a simulated continuous-batching engine. See ``llm.py`` and ``spec.py``."""
from .api import Completion, Engine, EngineStats, SamplingParams
from .llm import LLM
from .spec import make_engine

__all__ = ["Completion", "Engine", "EngineStats", "LLM", "SamplingParams", "make_engine"]
