"""Actors and a raw responder used by ``nalar bench``."""
from __future__ import annotations

import asyncio
import os
import sys
import time

import nalar


class SyncEcho(nalar.Tool):
    """A sync actor (a pykka actor thread): the path a blocking agent method takes."""

    def echo(self, x: object) -> object:
        return x


async def raw_responder(url: str, subject: str, decode: bool = False) -> None:
    """The references: a bare nats-py responder that echoes each request's bytes, or (``decode``) one
    that does what real code does with a call, decode its JSON body and encode the answer (orjson)."""
    import nats
    import orjson

    nc = await nats.connect(url)

    async def on(msg):  # type: ignore[no-untyped-def]
        await msg.respond(msg.data)

    async def on_json(msg):  # type: ignore[no-untyped-def]
        call = orjson.loads(msg.data)
        await msg.respond(orjson.dumps({"v": call["a"][0]}))

    await nc.subscribe(subject, cb=on_json if decode else on)
    await nc.flush()
    print("raw responder ready", flush=True)
    await asyncio.Event().wait()


@nalar.hints(max_concurrency=256)
class Waiter(nalar.Tool):
    """``nalar bench control``: a tool that holds each call until a given Unix time."""

    async def wait(self, until: float) -> None:
        await asyncio.sleep(max(0.0, until - time.time()))


@nalar.hints(stateful=True, max_concurrency=None)
class StateBench(nalar.Agent):
    """``nalar bench state``: a counter and a blob per session (each call that changes them commits)."""

    async def incr(self) -> int:
        n = nalar.managed_value("n", 0)
        n.value += 1
        return n.value  # type: ignore[no-any-return]

    async def get(self) -> int:
        return nalar.managed_value("n", 0).value  # type: ignore[no-any-return]

    async def put(self, size: int, fill: str = "x") -> int:
        d = nalar.managed_dict("blob")
        d["data"] = (fill or "x")[0] * size
        return size

    async def append(self, item: str) -> int:
        items = nalar.managed_list("items")
        items.append(item)
        return len(items)

    async def size(self) -> int:
        return len(nalar.managed_dict("blob").get("data", ""))

    async def where(self) -> int:
        return os.getpid()


if __name__ == "__main__":
    asyncio.run(raw_responder(sys.argv[1], sys.argv[2], sys.argv[3:] == ["json"]))
