"""``module:Class`` or ``module:Class=N`` on the command line -> (class, instance count; 0 hosts it idle)."""
from __future__ import annotations

import importlib
import os
import sys

from ..actors.base import Actor


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
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r}: {e}") from None
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)  # type: ignore[assignment]
        if cls is None:
            raise ValueError(f"{spec!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise ValueError(f"{spec!r}: {class_name} is not a nalar.Agent, nalar.Tool or nalar.Model")
    return cls, n
