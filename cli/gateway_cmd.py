"""``nalar gateway``: its options, and serving ``cli/gateway.py``'s app on uvicorn until SIGINT/SIGTERM.

Kept apart from the app so that every other command's start does not import Starlette.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from . import logs
from .args import GLOBALS, byte_size, port

DEFAULT_MAX_BODY = 8 << 20  # the app's too (cli/gateway.py)
API_KEY_ENV = "NALAR_GATEWAY_API_KEY"


def build_app(gw: Any, metrics: bool = True) -> Any:
    """The Starlette app: every route, each behind ``Gateway.endpoint`` (the API key, error statuses);
    with ``metrics``, ``GET /metrics`` too, without the key (``cli/gateway_metrics.py`` says why)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from . import gateway_openai as oa
    from .gateway import call_actor

    from ..bus import tracing
    from .gateway_trace import TraceMiddleware

    app: Any = Starlette(routes=[
        Route("/v1/actors/{actor}/{method}", gw.endpoint(call_actor), methods=["POST"]),
        Route("/v1/chat/completions", gw.endpoint(oa.chat_completions), methods=["POST"]),
        Route("/v1/completions", gw.endpoint(oa.completions), methods=["POST"]),
        Route("/v1/models", gw.endpoint(oa.list_models), methods=["GET"]),
    ])
    if not metrics:
        return TraceMiddleware(app) if tracing.TRACER is not None else app  # the runtime turned tracing on
    from .gateway_metrics import GatewayMetrics

    gm = GatewayMetrics()
    app.router.routes.append(Route("/metrics", gm.endpoint, methods=["GET"]))
    return gm.wrap(TraceMiddleware(app) if tracing.TRACER is not None else app)


def _model_map(texts: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in texts:
        name, eq, actor = t.partition("=")
        if not eq or not name or not actor:
            raise ValueError(f"--model {t!r}: expected NAME=ACTOR, e.g. gpt-4o=Writer")
        out[name] = actor
    return out


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    g = sub.add_parser("gateway", help="serve the deployment over HTTP: any actor's methods and an "
                                       "OpenAI-compatible API for its models",
                       description="An HTTP front door: POST /v1/actors/ACTOR/METHOD (JSON arguments; "
                                   "X-Session-Id, X-Priority, X-Timeout headers), and OpenAI's "
                                   "/v1/chat/completions, /v1/completions and /v1/models for model actors. "
                                   "Connects with the client credential, as `nalar call` does.")
    g.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=port, default=8000, help="the port to listen on (default: 8000)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require Authorization: Bearer KEY from HTTP clients (default: ${API_KEY_ENV}; "
                        "none: anyone who reaches the port may call)")
    g.add_argument("--model", action="append", default=[], metavar="NAME=ACTOR",
                   help="serve the model actor ACTOR as the OpenAI model NAME (repeatable; every actor of "
                        "kind model is served by its own name besides)")
    g.add_argument("--max-body", type=byte_size, default=None, metavar="BYTES",
                   help=f"the largest request body, e.g. 4MiB (default: the NATS server's max_payload, at most "
                        f"{DEFAULT_MAX_BODY >> 20} MiB); larger ones are refused with 413")
    g.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="do not serve GET /metrics (Prometheus; served by default, without the API key: it "
                        "counts requests per route and status, and names no session, actor or model)")
    logs.add_args(g)
    g.add_argument("--nats", metavar="URL", default=None, help=GLOBALS["nats"][1])
    g.add_argument("--namespace", metavar="NS", default=None, help=GLOBALS["namespace"][1])


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM/SIGINT is a clean stop (exit 0, the client's connection
        closed), not re-raised once it has shut down (which would end the process with -15)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: do not wait for open connections
            else:
                self.should_exit = True

    return Server


async def serve_gateway(a: argparse.Namespace) -> int:
    import uvicorn

    from ..actors.client import connect_async
    from .gateway import Gateway

    models = _model_map(a.model)
    client = await connect_async(a.nats, a.namespace, name="nalar-gateway", role="client")
    try:
        gw = Gateway(client, api_key=a.api_key or os.environ.get(API_KEY_ENV), max_body=a.max_body, models=models)
        config = uvicorn.Config(build_app(gw, getattr(a, "metrics", True)), host=a.host, port=a.port, log_level="warning", lifespan="off",
                                access_log=False)
        server = _server_class()(config)
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            try:
                await task
            except SystemExit:  # uvicorn's way to say it could not bind: said in our line below
                pass
            print(f"nalar: the gateway could not listen on {a.host}:{a.port}", file=sys.stderr)
            return 1
        auth = "an API key required" if gw.api_key else "no API key"
        print(f"nalar gateway listening on http://{a.host}:{a.port} (namespace {client.runtime.subjects.ns!r}, "
              f"NATS {client.url}, {auth}, bodies up to {gw.max_body:,} bytes)", flush=True)
        await task
    finally:
        await client.aclose()
    return 0


def run(a: argparse.Namespace) -> int:
    return asyncio.run(serve_gateway(a))
