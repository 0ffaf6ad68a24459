"""Model actors on real engines, for tests/test_models_vllm.py (node processes import this module).

The engines are named by the test through ``$NALAR_LLM_<ACTOR>`` (the tiny model's directory and the
test server's port are only known then); ``engine_args`` here are what the tests rely on.
"""
from __future__ import annotations

from nalar.actors.models import LLM

#: The context the tests size their requests against.
MAX_MODEL_LEN = 4096


class TinyVllm(LLM):
    """vLLM in-process on the CPU, the tiny model with random (dummy) weights."""

    engine = "vllm:/path/set/by/the/test"  # $NALAR_LLM_TINYVLLM
    engine_args = {"load_format": "dummy", "enforce_eager": True, "max_model_len": MAX_MODEL_LEN}


class TinyOpenAI(LLM):
    """The tiny model behind a real `vllm serve` (the test's, served as "tiny")."""

    engine = "openai:http://127.0.0.1:8000/v1"  # $NALAR_LLM_TINYOPENAI
    engine_args = {"model": "tiny", "timeout_s": 60}


class DeadOpenAI(LLM):
    """An OpenAI engine whose server is not there (a model is named, so the instance starts)."""

    engine = "openai:http://127.0.0.1:9/v1"  # $NALAR_LLM_DEADOPENAI
    engine_args = {"model": "tiny", "timeout_s": 10}
