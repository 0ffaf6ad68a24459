"""Actor classes whose ``resources`` hints the node enforces (tests/test_resources.py)."""
from __future__ import annotations

import nalar


@nalar.hints(resources={"gpu": 1})
class Gpu(nalar.Tool):
    """Takes one GPU per instance."""

    def where(self) -> str | None:
        return self._nalar_instance or None


@nalar.hints(resources={"cpu": 1, "memory": 1 << 30})
class Small(nalar.Tool):
    """One CPU and 1 GiB per instance: fits anywhere a test runs."""

    def where(self) -> str | None:
        return self._nalar_instance or None
