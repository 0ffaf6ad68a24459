"""Profiles of the simulated engine: what one step of a continuous-batching engine costs.

A step's time is ``base + per_seq * decoding + per_ctx_k * context_tokens / 1000 + prefill * new_prompt
tokens``: the weights are read once per step (memory-bound, ``base``), each running sequence adds its
share of the matmuls and sampling (``per_seq``), attention reads each sequence's KV cache
(``per_ctx_k``), and prompt tokens are compute-bound (``prefill``). Where the numbers come from is in
``source``; they are estimates, and every output of the simulation says it is one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    base_ms: float
    per_seq_ms: float
    per_ctx_k_ms: float
    prefill_ms_per_token: float
    kv_capacity_tokens: int
    max_num_seqs: int
    max_batched_tokens: int  # tokens one step may carry (decodes + a chunk of prefills), as vLLM's
    chars_per_token: float = 4.0

    def with_overrides(self, **kw: Any) -> "Profile":
        known = set(self.__dataclass_fields__) - {"name", "source"}
        bad = set(kw) - known
        if bad:
            raise ValueError(f"unknown simulated-engine setting(s) {sorted(bad)}; known: {sorted(known)}")
        return replace(self, **kw)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile(
        "llama3-8b-a100",
        "Llama-3-8B (16.1 GB bf16 weights, 128 KiB of KV per token: 32 layers x 8 KV heads x 128 x 2 x 2 B) "
        "on one A100-80GB SXM (2.0 TB/s HBM, 312 TFLOPS bf16) under vLLM: base = weight read at ~80% of "
        "bandwidth; prefill = 16 GFLOP/token at ~60% of peak; KV = (0.9 x 80 GB - weights - ~2 GB "
        "activations) / 128 KiB; per_seq and per_ctx_k fitted so that 256 sequences of 1k context give "
        "~5.4k output tokens/s, in line with published vLLM throughput for 8B models on an A100. "
        "max_num_seqs and max_batched_tokens are vLLM V1's defaults.",
        base_ms=10.0, per_seq_ms=0.08, per_ctx_k_ms=0.065, prefill_ms_per_token=0.09,
        kv_capacity_tokens=412_000, max_num_seqs=256, max_batched_tokens=8192),
    Profile(
        "llama3-1b-a100",
        "Llama-3.2-1B (2.5 GB bf16 weights, 32 KiB of KV per token: 16 layers x 8 KV heads x 64 x 2 x 2 B) on "
        "one A100-80GB SXM under vLLM: a step of a model this small is bound by per-step overheads "
        "(scheduling, sampling, kernel launches: ~3 ms in vLLM) more than by its 1.3 ms weight read; "
        "prefill = 2.5 GFLOP/token at ~60% of peak; KV = (0.9 x 80 GB - weights - ~2 GB) / 32 KiB. For "
        "light models such as a router's classifier.",
        base_ms=3.0, per_seq_ms=0.02, per_ctx_k_ms=0.016, prefill_ms_per_token=0.014,
        kv_capacity_tokens=2_100_000, max_num_seqs=256, max_batched_tokens=8192),
    Profile(
        "llama3-8b-h100",
        "As llama3-8b-a100 with an H100-80GB SXM's 3.35 TB/s and 989 TFLOPS bf16 (~50% of peak in prefill).",
        base_ms=6.0, per_seq_ms=0.04, per_ctx_k_ms=0.04, prefill_ms_per_token=0.035,
        kv_capacity_tokens=412_000, max_num_seqs=256, max_batched_tokens=8192),
)}


def profile(name: str, **overrides: Any) -> Profile:
    try:
        p = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown simulated-engine profile {name!r}; known: {sorted(PROFILES)}") from None
    return p.with_overrides(**overrides) if overrides else p
