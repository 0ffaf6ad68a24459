"""Leader terms: whose decision batches this process takes, and in what order.

Policy actors elect one leader per namespace with a lease (``policy/lease.py``): the key ``leader`` of
the JetStream KV bucket ``nalar_<ns>_leader``, whose value names the leader and its *term*, the
revision at which it took the lease. Revisions only grow, so a later leader has a higher term. Every
batch (and the snapshot in ``nalar_<ns>_policy``) carries its leader's term, and every process keeps
the highest term it has verified (``TermGate.term``):

- a batch of a lower term is refused (``stale_term``): a deposed leader's, or a replay;
- a batch of a higher term is held, and every batch after it, while the lease is read: it is taken
  only if the lease's value names that term and the term is not above the lease entry's revision.
  A lease naming a higher term still is a verified newer leader: the batch is ``stale_term`` and the
  known term rises to the lease's. Anything else is ``forged_term``. Held batches then go on in the
  order they came, so a batch of the new term never overtakes the one that proved it;
- a batch with no term (or term 0) is taken only while no term is known (a deployment without
  JetStream, where there is no election).

The snapshot is read when a process starts or missed a batch. When no leader holds the lease (the
policy actor is down), its term cannot be verified; its decisions are the last leader's word, so they
apply, but the known term does not rise. Refusals are counted in the runtime's counters.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

import orjson

from ...bus import kv as bkv
from ...bus.errors import MalformedMessage

log = logging.getLogger("nalar.control")

STALE = "stale_term"
FORGED = "forged_term"
#: Seconds a lease read may take before the batch waiting on it is refused.
READ_TIMEOUT = 5.0


def term_of(msg: dict[str, Any]) -> int:
    """A batch's term: an int >= 0 (absent or ``null``: 0); anything else is ``MalformedMessage``."""
    t = msg.get("term")
    if t is None:
        return 0
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise MalformedMessage(f"a decision batch's term is an int >= 0, not {t!r:.40}")
    return t


class _Held:
    __slots__ = ("term", "snapshot", "apply", "refused")

    def __init__(self, term: int, snapshot: bool, apply: Callable[[], None],
                 refused: Callable[[str], None] | None) -> None:
        self.term, self.snapshot, self.apply, self.refused = term, snapshot, apply, refused


class TermGate:
    """The highest verified leader term, and the batches waiting on a lease read, in arrival order."""

    def __init__(self, jetstream: Callable[[], Any], namespace: str, counters: dict[str, int],
                 verify: bool = True) -> None:
        self.term = 0
        #: Read the lease before taking a higher term. A process without JetStream reads (a client)
        #: takes it as it comes: only the policy role may publish batches (``bus/auth.py``).
        self.verify = verify
        self.last_refused = ""  # why the last batch was refused (``nalar status``)
        self._jetstream = jetstream
        self._ns = namespace
        self._counters = counters
        self._kv: Any = None
        self._queue: deque[_Held] = deque()
        self._busy = False
        self._failed: set[int] = set()  # terms the lease did not bear out, while batches keep coming
        self._task: asyncio.Task[None] | None = None  # the lease read in flight (held: tasks are weak)

    def admit(self, term: int, apply: Callable[[], None], *, snapshot: bool = False,
              refused: Callable[[str], None] | None = None) -> None:
        """Run ``apply`` now, after the lease has been read, or never (``refused(why)``, counted).

        Call it on the loop. ``snapshot``: the stored copy, taken without a verified term when no
        leader holds the lease.
        """
        self._queue.append(_Held(term, snapshot, apply, refused))
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        q = self._queue
        while q and not self._busy:
            h = q[0]
            if h.term == self.term:
                q.popleft()
                self._run(h)
            elif h.term < self.term:
                q.popleft()
                self._refuse(h, STALE, f"term {h.term} is older than term {self.term}")
            elif h.term in self._failed:
                q.popleft()
                self._refuse(h, FORGED, f"term {h.term} is not the lease's")
            elif not self.verify:
                q.popleft()
                self.term = h.term
                self._run(h)
            else:
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._verify(h))
        if not q:
            self._failed.clear()  # a real leader may reach that term later

    async def _verify(self, h: _Held) -> None:
        lease: tuple[int, int] | None | Exception
        try:
            lease = await self._read()
        except Exception as e:  # the server is unreachable for now: the batch cannot be trusted
            lease = e
        q = self._queue
        if q and q[0] is h:
            q.popleft()
        self._busy = False
        try:
            self._judge(h, lease)
        finally:
            self._drain()

    def _judge(self, h: _Held, lease: tuple[int, int] | None | Exception) -> None:
        if isinstance(lease, Exception):
            self._refuse(h, FORGED, f"term {h.term}: the lease could not be read ({lease!r:.80})")
            return
        if lease is None:
            if h.snapshot:  # no leader now: the stored decisions are the last leader's
                self._run(h)
            else:
                self._refuse(h, FORGED, f"term {h.term}: no leader holds the lease")
            return
        held, rev = lease
        if held == h.term and h.term <= rev:
            self.term = h.term
            self._run(h)
        elif self.term < held <= rev and held > h.term:
            self.term = held  # a newer leader, verified: this batch is from before it
            self._refuse(h, STALE, f"term {h.term} is older than the lease's term {held}")
        else:
            self._failed.add(h.term)
            self._refuse(h, FORGED, f"term {h.term} is not the lease's (term {held} at revision {rev})")

    async def _read(self) -> tuple[int, int] | None:
        """The lease's (term, revision), or ``None`` if nobody holds it; a malformed value has term 0."""
        if self._kv is None:
            js = self._jetstream()
            if js is None:
                return None
            self._kv = await asyncio.wait_for(bkv.open_bucket(js, bkv.leader_bucket(self._ns), "policy leader lease",
                                                              create=False), READ_TIMEOUT)
            if self._kv is None:
                return None
        got = await asyncio.wait_for(bkv.get(self._kv, bkv.LEADER_KEY), READ_TIMEOUT)
        if got is None:
            return None
        value, rev = got
        try:
            body = orjson.loads(value)
            term = body.get("term") if isinstance(body, dict) else None
        except orjson.JSONDecodeError:
            term = None
        if not isinstance(term, int) or isinstance(term, bool):
            term = 0
        return term, rev

    def _run(self, h: _Held) -> None:
        try:
            h.apply()
        except Exception:  # one batch's failure must not stop the ones behind it
            log.exception("applying a decision batch failed")

    def _refuse(self, h: _Held, kind: str, why: str) -> None:
        self._counters[kind] = self._counters.get(kind, 0) + 1
        self.last_refused = f"{kind}: {why}"
        log.warning("refused a decision %s: %s", "snapshot" if h.snapshot else "batch", why)
        if h.refused is not None:
            try:
                h.refused(kind)
            except Exception:
                log.exception("a refusal callback failed")
