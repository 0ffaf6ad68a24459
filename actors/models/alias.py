"""``nalar.models``: this package under its public name, as a module (``import nalar.models``,
``from nalar.models import LLM``, ``import nalar.models.tiny``), not only an attribute of ``nalar``.

Every ``nalar.models.X`` is the module ``nalar.actors.models.X`` itself, loaded once. Two other ways
were ruled out: a ``package-dir`` entry mapping ``nalar.models`` to ``actors/models`` installs a second
copy of the package (two ``LLM`` classes), whose relative imports (``from ..base import Model``) fail
outside ``nalar.actors``; and only putting the package into ``sys.modules`` lets
``import nalar.models.simulated`` load simulated.py a second time, under the public name.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Sequence

PUBLIC = "nalar.models"
REAL = "nalar.actors.models"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``nalar.models.X`` where ``nalar.actors.models.X`` exists, and loads it as that module."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith(PUBLIC + "."):
            return None
        if importlib.util.find_spec(REAL + name[len(PUBLIC):]) is None:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a throwaway module: exec_module swaps the real one in

    def exec_module(self, module: types.ModuleType) -> None:
        # Once this returns, the import system hands out whatever sys.modules holds under the name.
        sys.modules[module.__name__] = importlib.import_module(REAL + module.__name__[len(PUBLIC):])


def install() -> None:
    """Register the alias (idempotent: ``import nalar`` may run twice under pytest's importlib mode)."""
    sys.modules.setdefault(PUBLIC, importlib.import_module(REAL))
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
