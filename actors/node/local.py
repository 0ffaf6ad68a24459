"""Local mode: the same actor classes, node and client code in one process, with no server.

The bus is ``LocalTransport`` (an in-process loopback with NATS' semantics), so arguments are still
encoded as JSON, deadlines and errors behave the same, and a test written against local mode means
the same thing against a deployment.
"""
from __future__ import annotations

from typing import Any

from ...bus.transport import LocalTransport
from ..client import gather_status
from ..loop import LoopThread
from .node import Node
from ..runtime import Runtime, set_default_runtime
from ..stub import Stub


class Local:
    """``with nalar.local(Analyst, (Research, 2)) as app: app.stub(Analyst).analyze("q").result()``."""

    def __init__(self, *actors: Any, namespace: str = "local", state_dir: str | None = None) -> None:
        self.specs: list[tuple[type, int | None]] = [a if isinstance(a, tuple) else (a, None) for a in actors]
        self.namespace = namespace
        self.state_dir = state_dir  # None: a temporary directory, removed when local mode stops
        self._tmp: str | None = None
        self._lt: LoopThread | None = None
        self.runtime: Runtime | None = None
        self.node: Node | None = None
        self._previous: Runtime | None = None

    def start(self) -> "Local":
        self._lt = LoopThread("nalar-local")
        self.runtime = Runtime(LocalTransport(), self.namespace, name="local")

        async def boot() -> Node:
            assert self.runtime is not None
            await self.runtime.start()
            if self.state_dir is None:
                import tempfile

                self._tmp = tempfile.mkdtemp(prefix="nalar-local-state-")
            node = Node(self.runtime, self.specs, name="local", state_dir=self.state_dir or self._tmp)
            await node.start()
            return node

        try:
            self.node = self._lt.run(boot(), 60)
        except BaseException:
            self._lt.stop()
            raise
        self._previous = set_default_runtime(self.runtime)
        return self

    def stub(self, target: Any, **options: Any) -> Stub:
        return Stub(target, self.runtime, **options)

    def status(self) -> list[dict[str, Any]]:
        assert self._lt is not None and self.runtime is not None
        return self._lt.run(gather_status(self.runtime, 1.0, 0.05), 10)

    def stop(self) -> None:
        if self._lt is None:
            return
        set_default_runtime(self._previous)
        try:
            if self.node is not None:
                self._lt.run(self.node.stop(), 30)
        finally:
            self._lt.stop()
            self._lt = None
            if self._tmp is not None:
                import shutil

                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __enter__(self) -> "Local":
        return self.start() if self._lt is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local(*actors: Any, namespace: str = "local", state_dir: str | None = None) -> Local:
    """Build local mode for these actor classes (or ``(class, instances)`` pairs); use it with ``with``.

    Session state lives in ``state_dir``, by default a temporary directory removed at the end.
    """
    return Local(*actors, namespace=namespace, state_dir=state_dir)
