"""Resource amounts: what an instance asks (the ``resources`` hint) and what a node has.

One vocabulary for both control levels: ``gpu=4,cpu=8,memory=64GiB`` as a node declares it, a
``{name: amount}`` dict on the wire, and the one rule for whether an ask fits what is free. Amounts
are plain numbers; memory-like resources (``memory``, ``gpu_memory``, ...) are bytes, accept size
units when parsed, and are shown in binary units. A name a node does not have is 0 there.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

#: Resources = amounts by name.
Amounts = dict[str, float]

_NAME = re.compile(r"^[a-z][a-z0-9_.\-]{0,39}$")
_NUMBER = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4,
               "tib": 1 << 40}
#: Slack when comparing amounts (fractions of a GPU add up with rounding errors).
EPS = 1e-9


def is_size(name: str) -> bool:
    """Memory-like resources are counted in bytes (and take size units)."""
    return name == "memory" or name.endswith(("_memory", "_mem", "-memory")) or name == "mem"


def parse_amount(name: str, text: str) -> float:
    """One amount: ``4``, ``0.5``, or for memory-like names a size (``64GiB``, ``512MB``, bytes)."""
    m = _NUMBER.match(text.strip().lower().replace("_", ""))
    if m is None:
        hint = " or a size such as 64GiB" if is_size(name) else ""
        raise ValueError(f"{name}={text!r}: expected a number >= 0{hint}")
    number, unit = m.groups()
    if unit and not is_size(name):
        raise ValueError(f"{name}={text!r}: only memory takes a size unit; give {name} a plain number")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{name}={text!r}: unknown size unit {unit!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return float(number) * _SIZE_UNITS[unit]


def parse_resources(text: str) -> Amounts:
    """``gpu=4,cpu=8,memory=64GiB`` as amounts (memory in bytes); a ``ValueError`` says what is wrong."""
    out: Amounts = {}
    if not text.strip():
        return out
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"{text!r}: an empty entry; write name=amount pairs separated by commas, "
                             "e.g. gpu=4,cpu=8,memory=64GiB")
        name, eq, amount = item.partition("=")
        name = name.strip().lower()
        if not eq or not amount.strip():
            raise ValueError(f"{item!r}: expected name=amount, e.g. gpu=4")
        if not _NAME.match(name):
            raise ValueError(f"{name!r}: a resource name is lowercase letters, digits, '_', '-' or '.', "
                             "starting with a letter")
        if name in out:
            raise ValueError(f"{name!r} is given twice in {text!r}")
        out[name] = parse_amount(name, amount)
    return out


def check_amounts(raw: Any, what: str, keep_zero: bool = False) -> Amounts:
    """A ``{name: amount >= 0}`` dict from the wire or a hint (strings parsed as on the command line);
    zero amounts are left out unless ``keep_zero`` (a node declaring ``gpu=0`` has none)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} must map resource names to amounts, not {raw!r:.80}")
    out: Amounts = {}
    for name, v in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{what}: {name!r} is not a resource name")
        if isinstance(v, str):
            v = parse_amount(name, v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: {name} must be a number >= 0, not {v!r}")
        if v > 0 or keep_zero:
            out[name] = float(v)
    return out


def free_of(total: Mapping[str, float], used: Mapping[str, float]) -> Amounts:
    """What is left (never below 0) of every resource either side names."""
    return {k: max(0.0, total.get(k, 0.0) - used.get(k, 0.0)) for k in sorted(set(total) | set(used))}


def short(ask: Mapping[str, float], free: Mapping[str, float], n: int = 1) -> list[str]:
    """The resources of which ``free`` holds less than ``n`` instances asking ``ask`` take (sorted)."""
    return sorted(k for k, v in ask.items() if v * n > free.get(k, 0.0) + EPS)


def no_room(ask: Mapping[str, float], free: Mapping[str, float], total: Mapping[str, float],
            n: int = 1) -> str | None:
    """Why ``n`` more instances asking ``ask`` each do not fit in ``free`` (``None``: they fit)."""
    lacking = short(ask, free, n)
    if not lacking:
        return None
    who = f"{n} instances ask" if n > 1 else "an instance asks"
    return (f"{who} {fmt(ask)}{' each' if n > 1 else ''}, but only {fmt({k: free.get(k, 0.0) for k in lacking})} "
            f"is free (of {fmt({k: total.get(k, 0.0) for k in lacking})})")


def add(into: Amounts, amounts: Mapping[str, float], sign: float = 1.0) -> None:
    for k, v in amounts.items():
        into[k] = into.get(k, 0.0) + sign * v
        if abs(into[k]) < EPS:
            into[k] = 0.0


# -- showing amounts ------------------------------------------------------------------------------------
def fmt_amount(name: str, v: float) -> str:
    """``8``, ``0.5``; memory-like resources in binary units (``64 GiB``)."""
    if not is_size(name):
        return f"{v:g}"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:g} B"


def fmt(amounts: Mapping[str, float]) -> str:
    """``cpu=2, gpu=1, memory=8 GiB`` (``nothing`` when empty)."""
    return ", ".join(f"{k}={fmt_amount(k, v)}" for k, v in sorted(amounts.items())) or "nothing"


def describe(total: Mapping[str, float], used: Mapping[str, float]) -> str:
    """One line of used and free per resource, as ``nalar status`` prints it."""
    free = free_of(total, used)
    return "; ".join(f"{k} {fmt_amount(k, used.get(k, 0.0))} of {fmt_amount(k, total.get(k, 0.0))} used, "
                     f"{fmt_amount(k, free[k])} free" for k in free) or "none"
