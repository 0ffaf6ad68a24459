"""Decisions checked on arrival: what a node refuses, whoever sent it.

The policy actor's primitives keep to the hints, so a batch that breaks them is forged or broken (or
its sender holds stolen credentials). A node checks each batch before it reaches its decision table,
so a refused op changes nothing, not even the table:

- a ``scale`` of this node's instances of an actor that would leave the deployment below
  ``max(1, min_instances)`` (this node's wanted count plus what the decisions place on the other live
  nodes: their wanted count where there is one, else the instances placed there);
- a ``scale`` above ``max_instances``, or, where the actor has no maximum, above
  ``MAX_INSTANCES_PER_NODE`` (``$NALAR_MAX_INSTANCES``, default 256): an absurd count;
- a ``scale`` that starts instances whose ``resources`` hint does not fit in what the node has free
  (checked by the node, which knows its capacity: ``NO_ROOM``);
- a batch whose version jumps more than ``MAX_VERSION_JUMP`` past the last one applied (once one has
  been): refused whole, since a forged huge version would make every real batch after it look stale.

The rest of a batch applies. ``Refusals`` counts each kind and keeps the latest reasons.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

log = logging.getLogger("nalar.control")

#: How far past the last applied version a batch may jump (the policy actor adds 1 per batch).
MAX_VERSION_JUMP = 100_000
#: Instances of an actor without ``max_instances`` one node may be asked to run.
DEFAULT_MAX_INSTANCES_PER_NODE = 256
#: Refusal reasons kept (the latest).
REASONS_KEPT = 20

BELOW_MIN, ABOVE_MAX, ABSURD, VERSION_JUMP = "below_min", "above_max", "absurd_count", "version_jump"
#: A ``scale`` that starts instances the node has no room for (``resources`` hint; ``actors/node/resources.py``).
NO_ROOM = "no_room"


def max_instances_per_node() -> int:
    """``$NALAR_MAX_INSTANCES`` (a whole number >= 1), else ``DEFAULT_MAX_INSTANCES_PER_NODE``."""
    raw = os.environ.get("NALAR_MAX_INSTANCES", "").strip()
    if raw:
        try:
            n = int(raw)
            if n >= 1:
                return n
        except ValueError:
            pass
        log.warning("ignoring NALAR_MAX_INSTANCES=%r (not a whole number >= 1)", raw)
    return DEFAULT_MAX_INSTANCES_PER_NODE


class Refusals:
    """Counts per kind of refusal, and the latest reasons (what ``nalar status`` shows)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def add(self, kind: str, key: str, why: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.reasons.pop(key, None)
        self.reasons[key] = f"{kind}: {why}"
        while len(self.reasons) > REASONS_KEPT:
            del self.reasons[next(iter(self.reasons))]
        log.warning("refused a decision: %s: %s", kind, why)


def version_jump(applied: int, v: Any) -> str | None:
    """Why a batch of version ``v`` is refused when ``applied`` is the last version applied, or ``None``."""
    if applied > 0 and isinstance(v, int) and not isinstance(v, bool) and v - applied > MAX_VERSION_JUMP:
        return f"version {v} jumps {v - applied} past v{applied} (at most {MAX_VERSION_JUMP})"
    return None


def scale_refusal(actor: str, node: str, count: int, have: int, lo: int, hi: int | None,
                  elsewhere: Callable[[], int]) -> tuple[str, str] | None:
    """(kind, why) if asking ``node`` for ``count`` instances of ``actor`` breaks its hints.

    ``have``: the instances it runs or is starting; ``lo``/``hi``: ``min_instances``/``max_instances``;
    ``elsewhere()``: the instances the decisions leave on the other live nodes (asked only for a cut).
    """
    if hi is not None and count > hi:
        return ABOVE_MAX, f"scale {actor} on {node} to {count}: max_instances is {hi}"
    cap = max_instances_per_node()
    if hi is None and count > cap:
        return ABSURD, f"scale {actor} on {node} to {count}: no max_instances, and at most {cap} per node"
    floor = max(1, lo)
    if count < have:
        left = count + elsewhere()
        if left < floor:
            return BELOW_MIN, f"scale {actor} on {node} to {count} leaves {left} in all: min_instances is {floor}"
    return None


def placed_elsewhere(actor: str, here: str, ops: Iterable[Any], full: bool, scale: dict[str, dict[str, Any]],
                     instances: dict[str, str], alive: Callable[[str], bool]) -> int:
    """The instances of ``actor`` the table will hold on live nodes other than ``here`` once the batch
    ``ops`` (raw wire lists; ``full``: a snapshot that replaces the table) applies: per node, its wanted
    count where one is set, else the instances placed there (ids ``<actor>-<node>-<n>``)."""
    wants: dict[str, Any] = {} if full else {n: per[actor][0] for n, per in scale.items() if actor in per}
    placed: dict[str, str] = {} if full else {i: n for i, n in instances.items() if i.startswith(actor + "-")}
    for op in ops:
        if not isinstance(op, list) or not op:
            continue
        if op[0] == "scale" and len(op) == 5 and op[2] == actor and isinstance(op[1], str):
            wants[op[1]] = op[3]
        elif op[0] == "instance" and len(op) == 3 and isinstance(op[1], str) and op[1].startswith(actor + "-"):
            if op[2] is None:
                placed.pop(op[1], None)
            elif isinstance(op[2], str):
                placed[op[1]] = op[2]
    total = 0
    nodes = {n for n in wants if wants[n] is not None} | set(placed.values())
    for n in nodes:
        if n == here or not alive(n):
            continue
        w = wants.get(n)
        if isinstance(w, int) and not isinstance(w, bool):
            total += w
        else:
            total += sum(1 for i, at in placed.items() if at == n and i.startswith(f"{actor}-{n}-"))
    return total
