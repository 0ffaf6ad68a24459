"""The per-unit log: the source of truth for session state, kept by JetStream.

Every unit (session, actor) has its own subject in one stream, ``nalar_<ns>_state``, on subjects
``nalar.<ns>.state.<session>.<actor>`` (each token base64url). A commit is appended with JetStream's
expected-last-subject-sequence check, so of two nodes appending on the same base only one succeeds:
the engine, not a protocol of ours, decides the order of a unit's versions. A record too large for one
message goes as consecutive parts on the same subject, each fenced on the one before it; readers keep
only complete records. Every message names the sequence it was appended on (``Nalar-Prev``), so a
reader notices a gap, and the latest snapshot's (``Nalar-Base``), so catching up is bounded.

Each append carries ``Nats-Msg-Id`` (future id, version, part): re-sending it after a lost
acknowledgement (a leader change, a reconnect) cannot store it twice.

``LocalLog`` stands in where there is no JetStream (local mode: one process, LMDB is all there is).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any, Callable, NamedTuple, Protocol

import orjson

from ..bus.errors import BusError, StateError, scrub
from ..bus.kv import replica_choices, replicas_wanted

log = logging.getLogger("nalar.state")
H_PREV, H_BASE, H_PART = "Nalar-Prev", "Nalar-Base", "Nalar-Part"
H_MSG_ID, H_EXPECT = "Nats-Msg-Id", "Nats-Expected-Last-Subject-Sequence"
#: Messages each unit's subject keeps (JetStream discards older ones); snapshots come far more often.
MAX_PER_UNIT = 4096
#: How long an append keeps trying through a leader election or a reconnect before the outcome is unknown.
APPEND_PATIENCE = 30.0
DUPLICATE_WINDOW = 120.0
_WRONG_LAST = (10071, 10164)  # "wrong last sequence: N", and its clustered form without N
_NOT_FOUND = 10037


class Fenced(Exception):
    """Another append landed on this unit first: the caller's base is stale."""

    def __init__(self, last: int) -> None:
        super().__init__(f"the unit's log moved on to sequence {last}")
        self.last = last


class Unreachable(StateError):
    """The log did not answer (no leader, no connection): an append's outcome is unknown."""


#: ``ask(subject, data, headers, timeout)``: one request, a future of the answer's (data, headers).
Ask = Callable[[str, bytes, "dict[str, str] | None", float], "asyncio.Future[tuple[bytes, dict[str, str] | None]]"]


class Msg(NamedTuple):
    seq: int
    headers: dict[str, str]
    data: bytes


class UnitLog(Protocol):
    """What the session gate needs of a log."""

    replicas: int

    async def append(self, unit: bytes, expected: int, parts: list[tuple[bytes, dict[str, str]]],
                     msg_id: str, deadline: float) -> list[int]:
        """Append ``parts`` in order, the first on ``expected``; their sequences. ``Fenced``, ``Unreachable``."""
        ...

    async def last(self, unit: bytes) -> Msg | None: ...

    async def read(self, unit: bytes, start: int, upto: int) -> list[Msg]:
        """The unit's messages with sequence in ``[start, upto]``, in order."""
        ...

    async def actors_of(self, session: str) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _unb64(t: str) -> str:
    return base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)).decode()


def stream_name(namespace: str) -> str:
    return f"nalar_{namespace}_state"


class JetStreamLog:
    """The log in a JetStream stream, spoken to with plain requests (orjson, no per-call objects)."""

    def __init__(self, nc: Any, namespace: str, replicas: int, ask: Ask | None = None) -> None:
        self.nc = nc
        self._ask = ask  # a cheaper request path than the client library's (the node's runtime gives one)
        self.stream = stream_name(namespace)
        self.prefix = f"nalar.{namespace}.state."
        self.replicas = replicas
        self._get = f"$JS.API.STREAM.MSG.GET.{self.stream}"
        self.appends = 0
        self.fenced = 0
        self.resent = 0

    @classmethod
    async def open(cls, js: Any, nc: Any, namespace: str, replicas: int | None = None,
                   ask: Ask | None = None) -> "JetStreamLog":
        """Open or create the stream; ``replicas`` None: 3 where the cluster has room, else 1."""
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        name = stream_name(namespace)
        try:
            want = replicas_wanted() if replicas is None else replicas
        except BusError as e:
            raise StateError(str(e)) from None
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            info = None
        except Exception as e:
            raise StateError(f"session state needs JetStream on the NATS server ({e!r}); start nats-server "
                             "with -js") from None
        if info is not None:
            have = int(info.config.num_replicas or 1)
            if want is not None and want != have:
                cfg = info.config
                cfg.num_replicas = want
                try:
                    await js.update_stream(cfg)
                    log.warning("state stream %s: replicas %d -> %d", name, have, want)
                    have = want
                except Exception as e:
                    raise StateError(f"cannot change the state stream {name} to {want} replicas: {e}") from None
            return cls(nc, namespace, have, ask)
        for r in replica_choices(want):
            cfg = StreamConfig(name=name, subjects=[f"nalar.{namespace}.state.>"], storage=StorageType.FILE,
                               num_replicas=r, max_msgs_per_subject=MAX_PER_UNIT, discard=DiscardPolicy.OLD,
                               duplicate_window=DUPLICATE_WINDOW,
                               description="nalar session state: one subject per (session, actor)")
            try:
                await js.add_stream(cfg)
                return cls(nc, namespace, r, ask)
            except Exception as e:
                if want is not None or r == 1:
                    try:  # another node created it at the same moment
                        info = await js.stream_info(name)
                        return cls(nc, namespace, int(info.config.num_replicas or 1), ask)
                    except Exception:
                        raise StateError(f"cannot create the state stream {name} with {r} replicas: {e}") from None
                log.info("state stream %s: %d replicas not possible here (%s); trying 1", name, r, e)
        raise AssertionError("unreachable")

    def subject(self, unit: bytes) -> str:
        s, _, a = unit.partition(b"\x00")
        return f"{self.prefix}{_b64(s.decode())}.{_b64(a.decode())}"

    def describe(self) -> dict[str, Any]:
        return {"log": "jetstream", "stream": self.stream, "replicas": self.replicas, "appends": self.appends,
                "fenced": self.fenced, "resent": self.resent}

    async def _request(self, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float) -> Any:
        if self._ask is not None:
            got, h = await self._ask(subject, data, headers, timeout)
            return self.decode_answer(got, h)
        msg = await self.nc.request(subject, data, timeout=timeout, headers=headers)
        return orjson.loads(msg.data)

    async def append(self, unit: bytes, expected: int, parts: list[tuple[bytes, dict[str, str]]],
                     msg_id: str, deadline: float) -> list[int]:
        subject = self.subject(unit)
        seqs: list[int] = []
        prev = expected
        give_up = min(deadline, time.time() + APPEND_PATIENCE)
        for i, (data, headers) in enumerate(parts):
            seq = await self._append_one(subject, data, self.headers_for(headers, prev, f"{msg_id}:{i}"), give_up)
            seqs.append(seq)
            prev = seq
        self.appends += 1
        return seqs

    def headers_for(self, headers: dict[str, str], prev: int, msg_id: str) -> dict[str, str]:
        h = dict(headers)
        h[H_EXPECT] = h[H_PREV] = str(prev)
        h[H_MSG_ID] = msg_id
        return h

    def quick_append(self, unit: bytes, expected: int, data: bytes, headers: dict[str, str],
                     msg_id: str) -> "asyncio.Future[tuple[bytes, dict[str, str] | None]] | None":
        """One single-message append's first try, as a future of the raw answer (``ack_seq`` reads it);
        None where there is no cheap way to send it. A caller that gets anything but a sequence or
        ``Fenced`` from it goes on with ``append`` (the same message id: a first try that was stored
        is then acknowledged as a duplicate)."""
        if self._ask is None:
            return None
        return self._ask(self.subject(unit), data, self.headers_for(headers, expected, f"{msg_id}:0"), 5.0)

    def ack_seq(self, ack: Any) -> int | None:
        """The sequence an append's answer gives; ``Fenced`` or ``StateError`` if it refused it; None if
        it is worth another try (no leader yet, a timeout)."""
        err = ack.get("error") if isinstance(ack, dict) else None
        if err is None and isinstance(ack, dict) and isinstance(ack.get("seq"), int):
            return int(ack["seq"])
        if not isinstance(err, dict):
            return None
        if err.get("err_code") in _WRONG_LAST or "wrong last sequence" in str(err.get("description", "")):
            self.fenced += 1
            raise Fenced(_last_from(err))
        if err.get("code") not in (503, 500, 408):
            raise StateError(f"the state log refused an append: {_said(err, 'an append')}")
        return None

    def decode_answer(self, got: bytes, headers: dict[str, str] | None) -> Any:
        """An answer from ``ask`` as JSON (``NoRespondersError`` for NATS's 503: no stream leader)."""
        if not got and headers and headers.get("Status") == "503":
            from nats.errors import NoRespondersError

            raise NoRespondersError
        return orjson.loads(got)

    async def _append_one(self, subject: str, data: bytes, headers: dict[str, str], give_up: float) -> int:
        from nats.errors import ConnectionClosedError, NoRespondersError, TimeoutError as NatsTimeout

        delay = 0.05
        while True:
            try:
                ack = await self._request(subject, data, headers, timeout=max(0.5, min(5.0, give_up - time.time())))
            except (NoRespondersError, NatsTimeout, asyncio.TimeoutError) as e:  # an election, a slow disk
                why = f"{type(e).__name__}"
            except ConnectionClosedError:
                raise Unreachable("the connection to NATS is closed: the append's outcome is unknown") from None
            except orjson.JSONDecodeError:
                why = "an unreadable acknowledgement"
            else:
                try:
                    seq = self.ack_seq(ack)
                except Fenced:
                    # JetStream checks the expected sequence before the message id: an earlier try of
                    # this very message that was stored (its answer lost) looks like a lost race
                    mine = await self._stored_as(subject, int(headers[H_PREV]), headers[H_MSG_ID])
                    if mine is None:
                        raise
                    self.fenced -= 1
                    return mine
                if seq is not None:
                    return seq
                why = str(ack.get("error") if isinstance(ack, dict) else ack)
            if time.time() + delay >= give_up:
                raise Unreachable(f"the state log did not acknowledge an append for {APPEND_PATIENCE:.0f} s "
                                  f"({why}): its outcome is unknown")
            self.resent += 1
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def _stored_as(self, subject: str, prev: int, msg_id: str) -> int | None:
        """The sequence of the message after ``prev`` on the subject if it is the one with ``msg_id``."""
        nxt = await self._msg_get({"seq": prev + 1, "next_by_subj": subject})
        return nxt.seq if nxt is not None and nxt.headers.get(H_MSG_ID) == msg_id else None

    async def _msg_get(self, req: dict[str, Any], patience: float = 10.0) -> Msg | None:
        from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

        give_up = time.time() + patience
        delay = 0.05
        while True:
            try:
                resp = await self._request(self._get, orjson.dumps(req), None, timeout=5.0)
                break
            except (NoRespondersError, NatsTimeout, asyncio.TimeoutError) as e:
                if time.time() + delay >= give_up:
                    raise Unreachable(f"the state log did not answer a read ({type(e).__name__})") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        err = resp.get("error")
        if err is not None:
            if err.get("err_code") == _NOT_FOUND or err.get("code") == 404:
                return None
            raise StateError(f"the state log refused a read: {_said(err, 'a read')}")
        m = resp["message"]
        headers = _parse_headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}
        data = base64.b64decode(m["data"]) if m.get("data") else b""
        return Msg(int(m["seq"]), headers, data)

    async def last(self, unit: bytes) -> Msg | None:
        return await self._msg_get({"last_by_subj": self.subject(unit)})

    async def read(self, unit: bytes, start: int, upto: int) -> list[Msg]:
        subject = self.subject(unit)
        out: list[Msg] = []
        seq = max(1, start)
        while seq <= upto:
            m = await self._msg_get({"seq": seq, "next_by_subj": subject})
            if m is None or m.seq > upto:
                break
            out.append(m)
            seq = m.seq + 1
        return out

    async def actors_of(self, session: str) -> list[str]:
        filt = f"{self.prefix}{_b64(session)}.*"
        resp = await self._request(f"$JS.API.STREAM.INFO.{self.stream}", orjson.dumps({"subjects_filter": filt}),
                                   None, timeout=5.0)
        subjects = (resp.get("state") or {}).get("subjects") or {}
        out = []
        for s in subjects:
            try:
                out.append(_unb64(s.rpartition(".")[2]))
            except (ValueError, UnicodeDecodeError):
                continue
        return sorted(out)


def _said(err: dict[str, Any], what: str) -> str:
    """JetStream's refusal as a caller may see it: its code and description without host paths (a
    store failure's names the server's files); the full answer goes to this node's log."""
    log.warning("the state log refused %s: %s", what, err)
    return f"{scrub(str(err.get('description')))} (JetStream error {err.get('err_code')})"


def _last_from(err: dict[str, Any]) -> int:
    desc = str(err.get("description", ""))
    digits = "".join(ch for ch in desc.rpartition(" ")[2] if ch.isdigit())
    return int(digits) if digits else -1


def _parse_headers(raw: bytes) -> dict[str, str]:
    """``NATS/1.0\\r\\nKey: value\\r\\n...`` as a dict."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep:
            out[k.decode().strip()] = v.decode().strip()
    return out


class LocalLog:
    """No JetStream (local mode, one process): the node's own LMDB is the only copy; appends still fence."""

    replicas = 1

    def __init__(self, head_seq: Any) -> None:
        self._head_seq = head_seq  # unit -> the store's sequence (for the first append after a restart)
        self._last: dict[bytes, int] = {}
        self.appends = 0

    async def append(self, unit: bytes, expected: int, parts: list[tuple[bytes, dict[str, str]]],
                     msg_id: str, deadline: float) -> list[int]:
        cur = self._last.get(unit)
        if cur is None:
            cur = int(self._head_seq(unit))
        if cur != expected:
            raise Fenced(cur)
        seqs = list(range(cur + 1, cur + 1 + len(parts)))
        self._last[unit] = seqs[-1]
        self.appends += 1
        return seqs

    def rewind(self, unit: bytes) -> None:
        """The store could not take the last append: the store's sequence is the truth again."""
        self._last.pop(unit, None)

    async def last(self, unit: bytes) -> Msg | None:
        cur = int(self._head_seq(unit))  # what is applied: there is nothing to read beyond it
        return Msg(cur, {}, b"") if cur else None

    async def read(self, unit: bytes, start: int, upto: int) -> list[Msg]:
        return []

    async def actors_of(self, session: str) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"log": "local (no JetStream: this node's LMDB is the only copy)", "replicas": 1,
                "appends": self.appends}
