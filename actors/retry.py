"""Retry policy: when the runtime re-sends a call, how long it keeps trying, and how it notices that
an executor died.

A node acknowledges a call once it has held it for a second (calls that finish sooner need no
acknowledgement) and publishes a heartbeat every second. A caller re-sends a call, with the same
future id and the next attempt number, when for ``attempt_timeout`` seconds the call was neither
acknowledged nor held by a node whose heartbeat is fresh. Committed futures are recognised by id, so
a re-sent call changes session state at most once: at-least-once execution, exactly-once effect.

Application exceptions are not retried unless ``retry_errors`` is set. NATS's "no responders" answer
(no node subscribes to the actor) and an ``Unavailable`` answer are looked at again after the
back-off, since a node may be restarting (a killed node is back in a few seconds) or its state's
JetStream stream may be electing a leader (several seconds). The default policy keeps trying for
``give_up_after`` seconds from the first send (30 s), never past the call's own deadline, with a
back-off that doubles from 0.1 s up to 2 s. Then "no responders" is a clear ``UnknownActor`` (the call
never ran), and a call that was sent but never answered is ``Unavailable``, naming the future id to
pass as ``key=`` to learn its outcome. ``NO_RETRY`` sends once and fails at once.
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
    """``attempts`` caps the sends (``None``: bounded by time only); ``give_up_after`` bounds the
    retries in seconds from the first send. The call's deadline bounds both."""

    attempts: int | None = None
    backoff: float = 0.1
    max_backoff: float = 2.0
    attempt_timeout: float = 10.0
    retry_errors: bool = False
    give_up_after: float = 30.0

    def __post_init__(self) -> None:
        a = self.attempts
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError("RetryPolicy.attempts must be an int >= 1, or None (bounded by give_up_after)")
        for name in ("backoff", "max_backoff", "attempt_timeout", "give_up_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0")
        if self.attempt_timeout < 2 * HEARTBEAT_INTERVAL:
            raise ValueError(f"RetryPolicy.attempt_timeout must be at least {2 * HEARTBEAT_INTERVAL} s "
                             "(twice the nodes' heartbeat interval)")

    @property
    def retries(self) -> bool:
        """May a call be sent more than once?"""
        return self.attempts is None or self.attempts > 1

    def delay(self, attempt: int) -> float:
        """Back-off before attempt number ``attempt`` (1 = the first retry)."""
        return float(min(self.max_backoff, self.backoff * (2 ** min(62, max(0, attempt - 1)))))


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)
