"""A node's capacity: what it has (declared, else read from the machine) and what its instances hold.

An instance holds what its class's ``resources`` hint asks from the moment it is placed (at node start,
or when a ``provision`` reserves room for it, before its ``on_start`` runs: two provisions cannot both
take the last GPU) until it is killed. A draining instance's resources count as free at once, so that
a policy's kill-and-provision on one node (``reassign``) fits; the draining one still finishes the
calls it runs. The totals and what is held travel in the node's metrics, so the policy actor places
only where an instance fits, and the node refuses what does not, whoever asked.
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
from typing import Mapping

from ..hints import Hints
from ..resources import Amounts, add, check_amounts, free_of, no_room, parse_resources

log = logging.getLogger("nalar.node")

#: Seconds ``nvidia-smi -L`` gets to answer before a node counts no GPU.
GPU_PROBE_TIMEOUT = 5.0


class NoRoom(ValueError):
    """An instance does not fit in what the node has free: said in a line (the actor, its ask, the room)."""


def cpus() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


def memory_bytes() -> float:
    """``MemTotal`` of ``/proc/meminfo``, else the physical pages the OS reports."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def gpus(timeout: float = GPU_PROBE_TIMEOUT) -> float:
    """GPUs ``nvidia-smi -L`` lists (within ``$CUDA_VISIBLE_DEVICES`` if set); 0 if it is absent or silent."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0.0
    n = sum(1 for line in r.stdout.splitlines() if line.startswith("GPU ")) if r.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and n:
        n = min(n, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return float(n)


@functools.cache
def detected() -> tuple[tuple[str, float], ...]:
    """What this machine has: CPUs, memory (bytes), GPUs (read once per process)."""
    return (("cpu", cpus()), ("memory", memory_bytes()), ("gpu", gpus()))


def machine(skip: set[str] | frozenset[str] = frozenset()) -> Amounts:
    """The detected amounts, minus those named in ``skip`` (declared: no need to probe for them)."""
    if {"cpu", "memory", "gpu"} <= skip:
        return {}
    if "gpu" in skip:  # declared GPUs: do not run nvidia-smi at all
        return {k: v for k, v in (("cpu", cpus()), ("memory", memory_bytes())) if k not in skip}
    return {k: v for k, v in detected() if k not in skip}


def from_env() -> Amounts | None:
    """``$NALAR_RESOURCES`` (``gpu=4,cpu=8,memory=64GiB``), or ``None`` if unset."""
    raw = os.environ.get("NALAR_RESOURCES")
    if raw is None or not raw.strip():
        return None
    try:
        return parse_resources(raw)
    except ValueError as e:
        raise ValueError(f"$NALAR_RESOURCES: {e}") from None


def ask_of(actor: str, hints: Hints) -> Amounts:
    """What one instance of ``actor`` takes (its ``resources`` hint, zero amounts left out)."""
    return check_amounts(hints.resources, f"{actor}'s resources hint")


class Capacity:
    """The node's totals and who holds what (by instance id, or a provision's token while it starts)."""

    def __init__(self, total: Mapping[str, float]) -> None:
        self.total: Amounts = dict(total)
        self.held: dict[str, Amounts] = {}
        self._used: Amounts = {}
        self._tokens = 0

    @classmethod
    def for_node(cls, declared: Mapping[str, float] | None = None) -> Capacity:
        """Declared amounts win; the rest is read from the machine (a resource named nowhere is 0)."""
        decl = check_amounts(dict(declared or {}), "--resources", keep_zero=True)
        return cls({**machine(frozenset(decl)), **decl})

    def used(self) -> Amounts:
        return {k: v for k, v in self._used.items() if v > 0}

    def free(self) -> Amounts:
        return free_of(self.total, self._used)

    def lack(self, ask: Mapping[str, float], n: int = 1) -> str | None:
        """Why ``n`` more instances asking ``ask`` do not fit (``None``: they do)."""
        return no_room(ask, self.free(), self.total, n) if ask else None

    def take(self, holder: str, ask: Mapping[str, float]) -> None:
        if ask and holder not in self.held:
            self.held[holder] = dict(ask)
            add(self._used, ask)

    def reserve(self, ask: Mapping[str, float]) -> str:
        """Hold ``ask`` for an instance not made yet; the token is renamed to its id once it is."""
        self._tokens += 1
        token = f"#provision-{self._tokens}"
        self.take(token, ask)
        return token

    def rename(self, holder: str, new: str) -> None:
        ask = self.held.pop(holder, None)
        if ask is not None:
            self.held[new] = ask

    def release(self, holder: str) -> None:
        """``holder`` is gone (killed, or failed to start): what it held is free again. Idempotent."""
        ask = self.held.pop(holder, None)
        if ask is not None:
            add(self._used, ask, -1.0)

    def to_wire(self) -> dict[str, Amounts]:
        """In the node's metrics: ``{"total": {...}, "used": {...}}``."""
        return {"total": dict(self.total), "used": self.used()}

    def status(self) -> dict[str, Amounts]:
        return {"total": dict(self.total), "used": self.used(), "free": self.free()}
