"""``module:Class`` or ``module:Class=N`` on the command line -> (class, instance count; 0 hosts it idle)."""
from __future__ import annotations

from ..actors.base import Actor
from ..actors.loading import load_class


def parse_spec(spec: str) -> tuple[type, int | None]:
    target, _, count = spec.partition("=")
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"{spec!r}: expected module:Class or module:Class=N")
    n: int | None = None
    if count:
        if not count.isdigit():
            raise ValueError(f"{spec!r}: the instance count after '=' must be an integer >= 0 "
                             "(0: hosted, for the policy to provision)")
        n = int(count)
    cls = load_class(target, Actor, "nalar.Agent, nalar.Tool or nalar.Model", spec)
    return cls, n
