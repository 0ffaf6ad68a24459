"""A policy round as a span: when it ran, what it saw, and the ops it decided, by kind.

Only rounds that decided something (ops, or refusals) are traced: an idle deployment's rounds, one or
four a second, would bury the requests in Jaeger. The span is its own trace (a round serves no
request) and is written once the round is done, with the round's real start and end times.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..bus import tracing


def round_span(stats: dict[str, Any], ops: list[list[Any]], refused: int, start_ns: int, name: str) -> None:
    """Export the round's span (a no-op without tracing, or for a round that decided nothing)."""
    tracer = tracing.TRACER
    if tracer is None or (not ops and not refused):
        return
    kinds = Counter(str(op[0]) for op in ops if op)
    attrs: dict[str, Any] = {
        "nalar.policy.actor": name, "nalar.policy.round": stats["round"], "nalar.policy.term": stats["term"],
        "nalar.decisions.version": stats["v"], "nalar.policy.nodes": stats["nodes"],
        "nalar.policy.applied_by": stats["applied_by"], "nalar.policy.futures": stats["futures"],
        "nalar.policy.ops": len(ops), "nalar.policy.refused": refused,
        "nalar.policy.collect_ms": stats["collect_ms"], "nalar.policy.decide_ms": stats["policy_ms"],
        "nalar.policy.broadcast_ms": stats["broadcast_ms"],
    }
    for kind, n in sorted(kinds.items()):
        attrs[f"nalar.policy.ops.{kind}"] = n
    span = tracer.start_span("policy round", start_time=start_ns, attributes=attrs)
    span.end(end_time=time.time_ns())
