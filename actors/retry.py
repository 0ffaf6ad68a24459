"""Retry policy: when the runtime re-sends a call, and how it notices that an executor died.

A node acknowledges a call once it has held it for a second (calls that finish sooner need no
acknowledgement) and publishes a heartbeat every second. A caller re-sends a call, with the same
future id and the next attempt number, when for ``attempt_timeout`` seconds the call was neither
acknowledged nor held by a node whose heartbeat is fresh. Committed futures are recognised by id, so
a re-sent call changes session state at most once: at-least-once execution, exactly-once effect.

Application exceptions are not retried unless ``retry_errors`` is set. NATS's "no responders" answer
(no node subscribes to the actor) is looked at again after the back-off, since a node may be
reconnecting or restarting; when the attempts are spent it is a clear ``UnknownActor`` (with the
default policy, after about 0.75 s; at once with ``NO_RETRY``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HEARTBEAT_INTERVAL = 1.0
#: A node whose last heartbeat is older than this is taken for dead (routing, the policy's metrics round).
LIVENESS_TIMEOUT = 3 * HEARTBEAT_INTERVAL
ACK_AFTER = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff: float = 0.25
    max_backoff: float = 5.0
    attempt_timeout: float = 10.0
    retry_errors: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be an int >= 1")
        for name in ("backoff", "max_backoff", "attempt_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0")
        if self.attempt_timeout < 2 * HEARTBEAT_INTERVAL:
            raise ValueError(f"RetryPolicy.attempt_timeout must be at least {2 * HEARTBEAT_INTERVAL} s "
                             "(twice the nodes' heartbeat interval)")

    def delay(self, attempt: int) -> float:
        """Back-off before attempt number ``attempt`` (1 = the first retry)."""
        return float(min(self.max_backoff, self.backoff * (2 ** max(0, attempt - 1))))


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)
