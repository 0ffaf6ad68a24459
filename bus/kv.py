"""JetStream key-value buckets: opened (or created) by whichever process gets there first."""
from __future__ import annotations

from typing import Any

from .errors import BusError


async def open_bucket(js: Any, bucket: str, description: str, history: int = 1, create: bool = True) -> Any:
    """The bucket's handle; creates it if missing (or returns ``None`` if ``create`` is false).

    ``js`` is a JetStream context (``Transport.jetstream()``). Raises ``BusError`` if the server has no
    JetStream.
    """
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        if not create:
            return None
        try:
            return await js.create_key_value(bucket=bucket, history=history, description=description)
        except Exception:  # another process created it at the same moment
            return await js.key_value(bucket)
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


def placement_bucket(namespace: str) -> str:
    """Which node holds each session unit (``state/placement.py``)."""
    return f"nalar_{namespace}_placement"


#: The key under which the policy actor keeps the decisions in force (a full snapshot).
POLICY_KEY = "table"
