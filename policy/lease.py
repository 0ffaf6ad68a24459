"""The leader lease: at most one policy actor of a namespace decides at a time.

The lease is the key ``leader`` of the JetStream KV bucket ``nalar_<ns>_leader``, created with a
bucket TTL of ``LEASE_TTL`` seconds, so an entry not rewritten within that time disappears:

- a standby looks every ``TRY_EVERY`` seconds; when the key is absent (the old lease expired, or its
  holder let go) it ``create``s it, which succeeds for one contender only. The revision R it got is
  the new leader's *term*; it writes ``{"leader": name, "term": R, "t": time}`` over it at once (with
  ``last=R``). Revisions only grow, so a later leader always has a higher term;
- the leader renews every ``RENEW_EVERY`` seconds with ``update(last=<its revision>)``; an update
  refused for its revision means another took the lease: it steps down at once;
- a leader whose last renewal was sent more than ``LEASE_TTL - MARGIN`` seconds ago may be cut off
  from the server: it must not decide (``fresh``) until it renews or steps down. The server expires
  the lease no sooner than ``LEASE_TTL`` after that renewal, so two leaders never decide at once;
- a leader that stops cleanly deletes the key (only if it still holds it), so a standby takes over
  within ``TRY_EVERY``.

Every batch carries the term; processes check it against this lease (``actors/control/term.py``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from ..bus import kv as bkv

log = logging.getLogger("nalar.policy")

LEASE_TTL = 3.0
RENEW_EVERY = 1.0
TRY_EVERY = 0.5
#: How long before the server could expire its lease a leader stops deciding.
MARGIN = 0.5
#: Seconds one KV operation on the lease may take.
OP_TIMEOUT = 2.0


class Lease:
    """One policy actor's side of the lease: ``try_take``, ``renew``, ``release``; ``term`` while held."""

    def __init__(self, js: Any, namespace: str, name: str) -> None:
        self.js = js
        self.namespace = namespace
        self.name = name
        self.term = 0  # > 0 while this actor holds the lease
        self.holder = ""  # the current holder's name, as last read ("" if none)
        self.holder_term = 0
        self._rev = 0  # the revision of this actor's last write of the lease
        self._renewed = 0.0  # monotonic time its last successful write was sent
        self._kv: Any = None

    async def open(self) -> None:
        self._kv = await bkv.open_bucket(self.js, bkv.leader_bucket(self.namespace), "policy leader lease",
                                         ttl=LEASE_TTL)

    @property
    def held(self) -> bool:
        return self.term > 0

    def fresh(self) -> bool:
        """Held, and renewed recently enough that no other actor can have taken it."""
        return self.held and time.monotonic() - self._renewed < LEASE_TTL - MARGIN

    def _value(self, term: int) -> bytes:
        return orjson.dumps({"leader": self.name, "term": term, "t": time.time()})

    async def try_take(self) -> bool:
        """Take the lease if nobody holds it; else note who does. True if this actor now leads."""
        from nats.js.errors import KeyWrongLastSequenceError

        got = await asyncio.wait_for(bkv.get(self._kv, bkv.LEADER_KEY), OP_TIMEOUT)
        if got is not None:
            self._note(got[0])
            return False
        sent = time.monotonic()
        try:
            rev = await asyncio.wait_for(self._kv.create(bkv.LEADER_KEY, self._value(0)), OP_TIMEOUT)
        except KeyWrongLastSequenceError:  # another standby was quicker
            return False
        try:
            self._rev = await asyncio.wait_for(self._kv.update(bkv.LEADER_KEY, self._value(rev), last=rev),
                                               OP_TIMEOUT)
        except KeyWrongLastSequenceError:
            return False
        self.term, self._renewed = rev, sent
        self.holder, self.holder_term = self.name, rev
        log.info("policy actor %s leads namespace %r (term %d)", self.name, self.namespace, rev)
        return True

    async def renew(self) -> bool:
        """Rewrite the lease; False (and no longer held) if another actor has taken it meanwhile."""
        from nats.js.errors import KeyWrongLastSequenceError

        sent = time.monotonic()
        try:
            self._rev = await asyncio.wait_for(
                self._kv.update(bkv.LEADER_KEY, self._value(self.term), last=self._rev), OP_TIMEOUT)
        except KeyWrongLastSequenceError:
            log.warning("policy actor %s lost the lease (term %d): stepping down", self.name, self.term)
            self.term = 0
            return False
        self._renewed = sent
        return True

    async def release(self) -> None:
        """Let go of the lease, if still held, so a standby takes over at once."""
        if not self.held:
            return
        term, self.term = self.term, 0
        try:
            await asyncio.wait_for(self._kv.delete(bkv.LEADER_KEY, last=self._rev), OP_TIMEOUT)
            log.info("policy actor %s released the lease (term %d)", self.name, term)
        except Exception as e:  # taken meanwhile, or the server is gone: it expires anyway
            log.debug("releasing the lease: %r", e)
        if self.holder == self.name:
            self.holder, self.holder_term = "", 0

    def _note(self, value: bytes) -> None:
        try:
            body = orjson.loads(value)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict):
            self.holder = str(body.get("leader", ""))
            t = body.get("term")
            self.holder_term = t if isinstance(t, int) and not isinstance(t, bool) else 0
