"""``nalar bench WHAT``: dispatch to the benchmark scripts."""
from __future__ import annotations


def main(what: str, argv: list[str]) -> int:
    if what == "calls":
        from .bench_calls import main as run
    elif what == "futures":
        from .bench_futures import main as run
    elif what == "control":
        from .bench_control import main as run
    elif what == "state":
        from .bench_state import main as run
    elif what in ("analyst", "router", "swe"):
        from .bench_workload import main as run_workload

        return run_workload(argv, what)
    else:
        raise ValueError(f"unknown benchmark {what!r}")
    return run(argv)
