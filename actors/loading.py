"""``module:Class`` names from the command line or the environment -> the class, with clear errors.

Only modules already installed or in the working directory are imported: names come from the
operator, never from a message.
"""
from __future__ import annotations

import importlib
import os
import sys


def load_class(target: str, base: type, what: str, spec: str | None = None) -> type:
    """The class ``target`` (``module:Class``, the class may be dotted) names; it must subclass ``base``.

    ``what`` names ``base`` in errors; ``spec`` is the text to quote in them (default: ``target``).
    """
    spec = spec or target
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"{spec!r}: expected module:Class")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r}: {e}") from None
    obj: object = module
    for part in class_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{spec!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ValueError(f"{spec!r}: {class_name} is not a {what}")
    return obj
