"""The CLI's connection: ``--timeout`` bounds connecting too, so no command outwaits what it was given.

The budget reaches ``open_connection`` through ``NALAR_CONNECT_TIMEOUT`` (as ``--replicas`` reaches
JetStream through ``NALAR_REPLICAS``): the client API takes no such argument, and one process makes
one connection.
"""
from __future__ import annotations

import argparse
import os

from ..actors.client import Client, connect_async
from ..bus.connection import first_connect_timeout


async def cli_client(a: argparse.Namespace, role: str) -> Client:
    """Connect for a command with ``--nats``, ``--namespace`` and ``--timeout``; failures are ``BusError``."""
    os.environ["NALAR_CONNECT_TIMEOUT"] = repr(min(float(a.timeout), first_connect_timeout()))
    return await connect_async(a.nats, a.namespace, name="nalar-cli", role=role)
