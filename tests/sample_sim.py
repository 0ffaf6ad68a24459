"""Model actors on the simulated engine, for tests (the simulation runs 20x faster than its profile)."""
from __future__ import annotations

from nalar.actors.models import LLM


class SimLLM(LLM):
    engine = "sim:llama3-8b-a100"
    engine_args = {"speed": 20.0}
