"""JetStream key-value buckets: opened (or created) by whichever process gets there first.

Everything nalar keeps in JetStream (these buckets, the session-state stream) is created with the
replica count the operator chose, ``NALAR_REPLICAS`` (``--replicas``), or else with what the
deployment can give: 3 replicas where the servers form a cluster with room for them, 1 on a single
server.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from .errors import BusError

log = logging.getLogger("nalar.bus")


def replicas_wanted() -> int | None:
    """``NALAR_REPLICAS`` as a number (None: unset, take what the cluster can give)."""
    raw = os.environ.get("NALAR_REPLICAS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise BusError(f"NALAR_REPLICAS={raw!r} is not a whole number (1, 3 or 5)") from None
    if not 1 <= n <= 5:
        raise BusError(f"NALAR_REPLICAS={n}: JetStream keeps 1 to 5 replicas")
    return n


def replica_choices(want: int | None) -> list[int]:
    """The replica counts to try creating with, in order."""
    return [want] if want is not None else [3, 1]


async def open_bucket(js: Any, bucket: str, description: str, history: int = 1, create: bool = True,
                      ttl: float | None = None) -> Any:
    """The bucket's handle; creates it if missing (or returns ``None`` if ``create`` is false).

    ``js`` is a JetStream context (``Transport.jetstream()``). ``ttl`` (seconds) makes every entry expire
    that long after it was last written (a lease). Raises ``BusError`` if the server has no JetStream.
    """
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        if not create:
            return None
        for r in replica_choices(replicas_wanted()):
            try:
                return await js.create_key_value(bucket=bucket, history=history, description=description,
                                                 replicas=r, ttl=ttl)
            except Exception as e:
                try:  # another process created it at the same moment
                    return await js.key_value(bucket)
                except BucketNotFoundError:
                    if r == 1 or replicas_wanted() is not None:
                        raise BusError(f"cannot create the JetStream bucket {bucket} with {r} replicas: {e}") from None
                    log.info("bucket %s: %d replicas not possible here (%s); trying 1", bucket, r, e)
        raise AssertionError("unreachable")
    except Exception as e:
        raise BusError(f"{description} needs JetStream on the NATS server ({e!r}); start nats-server with -js") from None


async def get(kv: Any, key: str) -> tuple[bytes, int] | None:
    """(value, revision), or ``None`` if the key is absent or deleted."""
    from nats.js.errors import KeyNotFoundError

    try:
        e = await kv.get(key)
    except KeyNotFoundError:
        return None
    if e.value is None or e.operation in ("DEL", "PURGE"):
        return None
    return e.value, int(e.revision)


def policy_bucket(namespace: str) -> str:
    """The policy actor's decisions in force (one key, ``POLICY_KEY``)."""
    return f"nalar_{namespace}_policy"


#: The key under which the policy actor keeps the decisions in force (a full snapshot).
POLICY_KEY = "table"


def leader_bucket(namespace: str) -> str:
    """The policy actors' leader lease (one key, ``LEADER_KEY``; entries expire: ``policy/lease.py``)."""
    return f"nalar_{namespace}_leader"


#: The key of the leader lease: ``{"leader": name, "term": term, "t": unix time}``.
LEADER_KEY = "leader"
