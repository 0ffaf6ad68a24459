"""``nalar call``: one call from the shell, its arguments inline, from a file (``@FILE``) or stdin (``-``).

A command line holds about 128 KiB per argument ("Argument list too long" past it); a file or a pipe
has no such limit. The server's ``max_payload`` still is one: a call over it is refused before anything
is sent, naming the limit and the setting that raises it.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, BinaryIO

import orjson

from ..bus import envelope as env
from ..bus.errors import PayloadTooLarge, RemoteError
from . import exits
from .connect import cli_client

ARGS_HELP = ("the arguments: a JSON array is the argument list, an object the keyword arguments, anything "
             "else the one argument; @FILE reads them from FILE, - from stdin (default: [])")


def read_arguments(text: str, stdin: BinaryIO | None = None) -> tuple[bytes | str, str]:
    """(the JSON text, where it came from): inline, ``@FILE`` or ``-`` (stdin)."""
    if text == "-":
        return (stdin or sys.stdin.buffer).read(), "stdin"
    if text.startswith("@"):
        path = text[1:]
        if not path:
            raise ValueError("'@' needs a file name: @args.json (or - for stdin)")
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as e:
            raise ValueError(f"cannot read the arguments from {path}: {e.strerror or e}") from None
    return text, ""


def parse_arguments(text: bytes | str, source: str = "") -> tuple[list[Any], dict[str, Any]]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if source:
            raise ValueError(f"the arguments in {source} are not JSON ({e})") from None
        raise ValueError(f"the arguments are not JSON ({e}); quote them, e.g. '[\"hello\"]'") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def too_large(e: PayloadTooLarge, target: str, url: str) -> str:
    return (f"the call {target} is {e.size:,} bytes ({_mib(e.size)}), over the max_payload of the NATS server at "
            f"{url or 'the server'}: {e.limit:,} bytes ({_mib(e.limit)}). Raise it where the server starts "
            f"(`nalar up --max-payload BYTES`, `nalar nats --max-payload BYTES`, or max_payload in a "
            f"nats-server config), or send a reference (a path, a key) instead of the bytes")


async def run_call(a: argparse.Namespace) -> int:
    actor, _, method = a.target.partition(".")
    if not actor or not method or method.startswith("_"):
        raise ValueError(f"{a.target!r}: expected ACTOR.METHOD, e.g. Analyst.analyze")
    args, kwargs = parse_arguments(*read_arguments(a.args))
    started = time.monotonic()
    client = await cli_client(a, "client")
    try:
        left = max(a.timeout - (time.monotonic() - started), 0.001)  # the deadline counts the connect too
        stub = client.stub(actor, timeout=left, session=a.session, priority=a.priority)
        try:
            result = await getattr(stub, method)(*args, **kwargs)
        except PayloadTooLarge as e:
            print(f"nalar: {too_large(e, a.target, client.url)}", file=sys.stderr)
            return exits.USAGE
        except RemoteError as e:
            print(f"nalar: {e}", file=sys.stderr)
            return exits.REMOTE
    finally:
        await client.aclose()
    sys.stdout.write(env.dumps(result, None).decode() + "\n")
    return exits.OK
