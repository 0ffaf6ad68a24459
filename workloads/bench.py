"""``nalar bench WHAT``: dispatch to the benchmark scripts."""
from __future__ import annotations

import asyncio


def _given_server(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--nats" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--nats="):
            return a.split("=", 1)[1]
    return None


def check_open(url: str) -> None:
    """The benchmarks compare nalar against raw nats-py, which has no role: a server given with
    ``--nats`` must admit connections without credentials. Say so at once rather than hang."""
    from ..bus.connection import ConnectOptions, open_connection
    from ..bus.errors import BusError

    async def probe() -> None:
        nc = await open_connection(ConnectOptions(servers=[u.strip() for u in url.split(",") if u.strip()],
                                                  name="nalar-bench-probe"))
        await nc.close()

    try:
        asyncio.run(probe())
    except BusError as e:
        if "requires credentials" in str(e):
            raise BusError(f"nalar bench --nats {url}: that server requires credentials, and the benchmarks "
                           "connect raw nats-py beside nalar (their reference) without any. Give them a "
                           "server of their own (leave out --nats), `nalar up --insecure`, or "
                           "`nalar nats --insecure`") from None
        raise


def main(what: str, argv: list[str]) -> int:
    url = _given_server(argv)
    if url is not None:
        check_open(url)
    if what == "calls":
        from .bench_calls import main as run
    elif what == "futures":
        from .bench_futures import main as run
    elif what == "control":
        from .bench_control import main as run
    elif what == "state":
        from .bench_state import main as run
    elif what == "batch":
        from .bench_batch import main as run
    elif what in ("analyst", "router", "swe"):
        from .bench_workload import main as run_workload

        return run_workload(argv, what)
    else:
        raise ValueError(f"unknown benchmark {what!r}")
    return run(argv)
