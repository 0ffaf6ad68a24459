"""Model actors on the simulated engine, for tests (the simulation runs 20x faster than its profile)."""
from __future__ import annotations

import nalar
from nalar.actors.models import LLM


class SimLLM(LLM):
    engine = "sim:llama3-8b-a100"
    engine_args = {"speed": 20.0}


@nalar.hints(preemptable=True, max_concurrency=1, max_instances=1)
class PreemptLLM(LLM):
    """One sequence at a time, preemptable: an urgent call takes the engine from a long generation,
    which runs again later and finds its prompt in the prefix cache."""

    engine = "sim:llama3-8b-a100"
    engine_args = {"speed": 8.0}
