"""The per-process runtime: one bus connection, the table of pending futures, replies and deadlines.

Every process that makes calls has one: a client (``nalar.connect``), a node (which adds serving on
top), or local mode. It is driven by one asyncio loop; other threads (pykka actors, user threads) hand
work to it through ``post``, which wakes the loop once per burst rather than once per message.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable

from ..bus import envelope as env
from ..bus import tracing
from ..bus.errors import (BadRequest, BusError, Cancelled, DeadlineExceeded, DependencyFailed, MalformedMessage, NalarError,
                          PayloadTooLarge, RemoteError, Unavailable, UnknownActor, from_wire)
from ..bus.subjects import Subjects
from ..bus.transport import NO_RESPONDERS, STATUS_HEADER, NatsTransport, Transport, is_no_responders
from .context import CallScope, current_scope
from .deadlines import DeadlineWheel
from .control import DecisionTable, TermGate, term_of
from .future import _LOCK, DONE, FAILED, LOOP_THREADS, PENDING, Future
from .retry import DEFAULT_RETRY, LIVENESS_TIMEOUT, RetryPolicy
from .stream import Items

DEFAULT_TIMEOUT = 300.0
#: Stands in for the ``traceparent`` header (W3C: always 55 characters) in the size check, which runs
#: before the call's span exists.
_TRACEPARENT_SIZED = "00-" + "0" * 32 + "-" + "0" * 16 + "-00"
_INHERIT: Any = object()
_default_runtime: "Runtime | None" = None
log = logging.getLogger("nalar.runtime")


def check_timeout(timeout: Any) -> float:
    """A timeout is a finite number of seconds > 0; anything else is a ``ValueError`` at the call site."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
    return float(timeout)


def default_timeout() -> float:
    raw = os.environ.get("NALAR_DEFAULT_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        return check_timeout(float(raw))
    except ValueError:
        log.warning("ignoring NALAR_DEFAULT_TIMEOUT=%r (not a finite number > 0); using %s s", raw, DEFAULT_TIMEOUT)
        return DEFAULT_TIMEOUT


def _session_id(session: Any) -> str | None:
    """A call's session id: one line of at most ``MAX_SESSION_LEN`` characters (else ``ValueError``)."""
    if session is _INHERIT or session is None:
        return None
    session = str(session)
    if len(session) > env.MAX_SESSION_LEN or env.CONTROL_CHARS.search(session):
        raise ValueError(f"a session id is at most {env.MAX_SESSION_LEN} characters, none of them a control "
                         "character (newline, tab, escape...)")
    return session


def check_key(key: Any) -> str:
    """An idempotency key is the call's future id: one line of printable characters, at most
    ``MAX_ID_LEN`` of them, without surrounding spaces (a header value); anything else is a ``ValueError``."""
    if (not isinstance(key, str) or not key or len(key) > env.MAX_ID_LEN or not key.isprintable()
            or key != key.strip()):
        raise ValueError(f"a call's key is a non-empty line of at most {env.MAX_ID_LEN} printable characters "
                         f"without surrounding spaces, not {key!r}")
    return key


def current_runtime() -> "Runtime":
    """The runtime that stubs without an explicit one use: the node's, the client's or local mode's."""
    if _default_runtime is None:
        raise NalarError("no nalar runtime in this process: call nalar.connect() or use nalar.local(...)")
    return _default_runtime


def set_default_runtime(rt: "Runtime | None") -> "Runtime | None":
    global _default_runtime
    old, _default_runtime = _default_runtime, rt
    return old


class _Retry:
    """What the runtime keeps to re-send a call.

    It keeps the arguments, not the encoded message: orjson's output holds a buffer of about 4 KiB
    whatever its length, which at 100k pending calls would be most of the memory they use.
    """

    __slots__ = ("policy", "attempt", "subject", "args", "kwargs", "headers", "reply", "node", "boot", "rk",
                 "first", "deadline", "unknown", "streamed")

    def __init__(self, policy: RetryPolicy, subject: str, args: Any, kwargs: Any, headers: dict[str, str],
                 reply: str, deadline: float) -> None:
        self.policy = policy
        self.attempt = 0
        self.first = 0.0  # monotonic time of the first send: ``give_up_after`` counts from there
        self.deadline = deadline  # the call's (Unix time): no attempt starts after it
        self.unknown = False  # an attempt went unanswered: it may have run, so giving up leaves the outcome unknown
        self.streamed = False  # items of a stream arrived: another attempt would send them again, so none is made
        self.subject = subject
        self.args = args
        self.kwargs = kwargs
        self.headers = headers
        self.reply = reply
        self.node: str | None = None  # the node that acknowledged holding it...
        self.boot = ""  # ...in which incarnation (a node restarted under the same name is another one)
        self.rk = 0


#: Error kinds worth another attempt even without ``retry_errors``: the executor side was unavailable.
_RETRYABLE_KINDS = {"unavailable"}


class Runtime:
    """Sends calls, resolves their futures from replies, enforces deadlines, propagates cancellation."""

    def __init__(self, transport: Transport, namespace: str = "default", name: str = "client",
                 principal: str = "anon", kv_reads: bool = True) -> None:
        self.transport = transport
        self.subjects = Subjects(namespace)
        self.name = name
        #: 64 random bits: future ids and reply subjects start with it, and nobody outside this process
        #: and the nodes that serve its calls sees it, so it cannot be guessed to cancel or answer them
        self.proc = secrets.token_hex(8)
        self._token_key = os.urandom(32)  # keys the unguessable half of every reply token
        self.principal = principal
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.pending: dict[str, Future[Any]] = {}
        self._ids = itertools.count(1)
        #: Calls whose caller chose the future id (``key``), while pending: key -> (future, reply token).
        #: Their token is not the id's tail, as it is for the runtime's own ids (``<proc>-<token>``).
        self._keyed: dict[str, tuple[Future[Any], str]] = {}
        #: Replies to ``request``/``scatter``, by token ("q<n>": never a call's token, which is hex).
        self._requests: dict[str, Callable[[bytes, dict[str, str] | None], None]] = {}
        self._qids = itertools.count(1)
        self._reply_prefix = self.subjects.reply_prefix(principal, self.proc)
        if isinstance(transport, NatsTransport):  # answer only on inboxes, whatever a message asks
            transport.replies_ok = self.subjects.replies_ok()
            transport.on_bad_reply = self._bad_reply
        self._plen = len(self._reply_prefix)
        self._out: deque[tuple[str, bytes, dict[str, str] | None, str]] = deque()
        self._draining = False
        self._drained: asyncio.Event | None = None
        self._posted: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._post_lock = threading.Lock()
        self._wheel = DeadlineWheel(self._expire)
        self._attempts = DeadlineWheel(self._check_attempt)  # when to ask "is my call's executor alive?"
        self.node_seen: dict[str, tuple[float, str]] = {}  # node -> (monotonic time of its last heartbeat, boot id)
        self.node_actors: dict[str, frozenset[str]] = {}  # node -> the actors its heartbeat says it serves
        self._subs: list[Any] = []
        self.default_timeout = default_timeout()
        self.counters: dict[str, int] = {"calls": 0, "late_replies": 0}
        self.malformed: dict[str, int] = {}
        self.closed = False
        self.table = DecisionTable()  # the policy actor's decisions in force here
        #: Called with each applied batch's ops and its reply subject (a node enforces them locally).
        self.on_decisions: Callable[[list[Any], str], None] | None = None
        self._reloading = False
        #: Reads the decisions and the leader lease from JetStream (nodes, the policy actor); a client
        #: or an operator has no JetStream rights (``bus/auth.py``): it asks a node for the decisions and
        #: takes the terms the server lets only the policy actor publish.
        self.kv_reads = kv_reads
        self.terms = TermGate(self.transport.jetstream, self.subjects.ns, self.counters,  # whose batches to take
                              verify=kv_reads)
        #: Checks a batch before the table gets it (a node's ``Enforcer.screen``; ``stored``: the KV snapshot):
        #: the batch to apply, or None.
        self.screen: Callable[[dict[str, Any], bool], dict[str, Any] | None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        LOOP_THREADS.add(self.loop_thread)
        tracing.configure(self.name)
        self._subs.append(await self.transport.subscribe(self._reply_prefix + "*", self._on_reply))
        self._subs.append(await self.transport.subscribe(self.subjects.heartbeat("*"), self._on_heartbeat))
        self._subs.append(await self.transport.subscribe(self.subjects.policy, self._on_policy))
        await self.transport.flush()
        await self.load_decisions()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wheel.stop()
        self._attempts.stop()
        await self.flush_out()
        for f in list(self.pending.values()):
            f._finish(FAILED, Cancelled("the runtime closed", actor=f.actor, method=f.method, future_id=f.id))
        self.pending.clear()
        await self.transport.close()
        LOOP_THREADS.discard(self.loop_thread)

    def subscriptions(self) -> list[str]:
        return [self._reply_prefix + "*", self.subjects.heartbeat("*"), self.subjects.policy]

    # -- decisions ---------------------------------------------------------------------------------
    async def load_decisions(self) -> None:
        """Take the decisions in force from the policy actor's snapshot (none yet, or no JetStream: none),
        if its leader's term holds (``control/term.py``). Without JetStream reads, from a node."""
        got = await (self._stored_decisions() if self.kv_reads else self._nodes_decisions())
        if got is None:
            return
        try:
            msg = dict(env.decode_json_object(got, "policy snapshot"), full=True)
            term = term_of(msg)
        except MalformedMessage as e:
            self.count_malformed("policy")
            log.warning("ignoring a malformed policy snapshot: %s", e)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def apply() -> None:
            try:
                if isinstance(msg.get("v"), int) and msg["v"] > self.table.version:
                    screened = msg if self.screen is None else self.screen(msg, True)
                    ops = self.table.apply(screened) if screened is not None else None
                    if ops and self.on_decisions is not None:
                        self.on_decisions(ops, "")
            except MalformedMessage as e:
                self.count_malformed("policy")
                log.warning("ignoring a malformed policy snapshot: %s", e)
            finally:
                if not done.done():
                    done.set_result(None)

        def refused(why: str) -> None:
            if not done.done():
                done.set_result(None)

        self.terms.admit(term, apply, snapshot=True, refused=refused)
        await done

    async def _stored_decisions(self) -> bytes | None:
        js = self.transport.jetstream()
        if js is None:
            return None
        from ..bus import kv as bkv

        try:
            kv = await asyncio.wait_for(bkv.open_bucket(js, bkv.policy_bucket(self.subjects.ns), "policy decisions",
                                                        create=False), 5)
            got = await asyncio.wait_for(bkv.get(kv, bkv.POLICY_KEY), 5) if kv is not None else None
        except Exception as e:  # no JetStream, say: serving goes on; the next broadcast brings decisions
            log.debug("could not read the policy's decisions: %r", e)
            return None
        return None if got is None else got[0]

    async def _nodes_decisions(self) -> bytes | None:
        """The decisions in force as a node has them (``policy.snapshot``), or ``None`` if none answers."""
        try:
            got = await self.request(self.subjects.policy_snapshot, {}, 3.0)
        except (NalarError, asyncio.TimeoutError) as e:  # no node yet: calls go to the queue groups for now
            log.debug("no node gave the decisions in force: %s", e)
            return None
        return env.dumps(got) if isinstance(got, dict) else None

    def _on_policy(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            msg = env.decode_json_object(data, "decisions")
            term = term_of(msg)
        except MalformedMessage as e:
            self.count_malformed("policy")
            log.warning("ignoring a malformed decision batch: %s", e)
            return

        def apply() -> None:  # once its term holds, in the order batches came
            try:
                screened = msg if self.screen is None else self.screen(msg, False)
                if screened is None:
                    return  # refused whole (the screen counted it)
                ops = self.table.apply(screened)
            except MalformedMessage as e:
                self.count_malformed("policy")
                log.warning("ignoring a malformed decision batch: %s", e)
                return
            if ops is None:
                if msg["v"] > self.table.version and not self._reloading:  # we missed one: take the snapshot
                    self._reloading = True
                    asyncio.get_running_loop().create_task(self._reload(reply))
                elif reply and self.on_decisions is not None:  # already applied: say so again (idempotent)
                    self.on_decisions([], reply)
                return
            if self.on_decisions is not None:
                self.on_decisions(ops, reply)

        self.terms.admit(term, apply)

    async def _reload(self, reply: str) -> None:
        try:
            await self.load_decisions()
        finally:
            self._reloading = False
        if reply and self.on_decisions is not None:
            self.on_decisions([], reply)

    def route(self, actor: str, session: str | None) -> str:
        """The subject a call goes to: its routed node's own subject, else the actor's queue group
        (also when the routed node has not been heard from lately: a dead node's routes are void)."""
        t = self.table
        if t.active:
            node = t.node_for(actor, session)
            if node is not None and self.alive(node):
                return self.subjects.call_at(actor, node)
        return self.subjects.call(actor)

    def alive(self, node: str) -> bool:
        """Has ``node`` sent a heartbeat within the last few intervals?"""
        seen = self.node_seen.get(node)
        return seen is not None and time.monotonic() - seen[0] < LIVENESS_TIMEOUT

    def serving(self, actor: str) -> list[str]:
        """The live nodes whose heartbeats say they serve ``actor``, sorted."""
        now = time.monotonic()
        return sorted(n for n, actors in self.node_actors.items()
                      if actor in actors and now - self.node_seen.get(n, (0.0, ""))[0] < LIVENESS_TIMEOUT)

    def served_within(self, actor: str, seconds: float) -> bool:
        """Did a node that serves ``actor`` send a heartbeat in the last ``seconds``?"""
        now = time.monotonic()
        return any(actor in actors and now - self.node_seen.get(n, (0.0, ""))[0] < seconds
                   for n, actors in self.node_actors.items())

    # -- thread hand-off -------------------------------------------------------------------------
    def on_loop(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; safe from any thread; one wake-up per burst."""
        with self._post_lock:
            first = not self._posted
            self._posted.append((fn, args))
        if first:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._run_posted)

    def _run_posted(self) -> None:
        with self._post_lock:
            batch, self._posted = self._posted, []
        for fn, args in batch:
            try:
                fn(*args)
            except Exception:  # one bad item must not drop the rest of the batch
                log.exception("nalar: posted %r failed", getattr(fn, "__name__", fn))

    def send(self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = "") -> None:
        """Publish from the loop thread without awaiting (a batch drains in one task)."""
        self._out.append((subject, data, headers, reply))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain_out())

    async def flush_out(self) -> None:
        """Wait until everything queued with ``send`` has been handed to the transport."""
        if self._out and not self._draining:
            self._draining = True
            await self._drain_out()
        while self._draining:
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()

    async def _drain_out(self) -> None:
        pub = self.transport.publish
        try:
            while self._out:
                subject, data, headers, reply = self._out.popleft()
                try:
                    await pub(subject, data, headers, reply)
                except Exception as e:  # a closed connection or an oversize reply: never kill the loop
                    self.counters["publish_errors"] = self.counters.get("publish_errors", 0) + 1
                    if not self.closed:
                        log.warning("publish to %s failed: %r", subject, e)
        finally:
            self._draining = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    # -- making calls ----------------------------------------------------------------------------
    def call(self, actor: str, method: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any],
             session: Any = _INHERIT, timeout: float | None = None, priority: int | None = None,
             retry: RetryPolicy | None = None, key: str | None = None) -> Future[Any]:
        """Create the future and send the call; returns at once. Non-JSON arguments raise ``TypeError``.

        ``key`` is the future id the executor sees, chosen by the caller so that a retry from another
        process (after this one died, or gave up with the outcome unknown) is recognised as the same
        call: answered from the running call or its committed reply instead of run again. A bad key,
        or one a call of this runtime still pending has, is a ``ValueError``.
        """
        if self.closed or self.transport.closed:
            raise BusError("this nalar runtime is closed (or lost its NATS connection for good)")
        token = self._new_token("")
        if key is None:
            fut: Future[Any] = Future(f"{self.proc}-{token}", actor, method, self)
        else:
            fut = self._keyed_future(check_key(key), token, actor, method)
        try:
            scope = current_scope.get()
            policy = DEFAULT_RETRY if retry is None else retry
            traced = tracing.TRACER is not None
            meta = self._meta(fut, scope, session, timeout, priority, policy.retries, traced)
            if meta is None:  # failed at once
                return fut
            headers = meta.to_headers()
            enc = _CallEncoder()
            data = env.encode_call(method, args, kwargs, enc)
            limit = self.transport.max_payload
            if not env.fits(data, headers, limit):  # (the message is only built for the error)
                env.check_size(data, headers, limit, f"the call {actor}.{method}")
        except BaseException:
            if key is not None:
                self._unkey(fut)
            raise
        if traced:
            self._trace_call(fut, scope, headers, meta)
        self._start(fut, token, meta, headers, data, enc, policy, args, kwargs)
        return fut

    def _keyed_future(self, key: str, token: str, actor: str, method: str) -> Future[Any]:
        """The future of a call with a caller-chosen id, registered so its reply token can be found."""
        tail = self.pending.get(key.rpartition("-")[2])
        if tail is not None and tail.id == key:  # a pending call of ours without a key has that id
            raise ValueError(f"a call with key {key!r} is already pending in this process")
        fut: Future[Any] = Future(key, actor, method, self)
        if self._keyed.setdefault(key, (fut, token))[0] is not fut:
            raise ValueError(f"a call with key {key!r} is already pending in this process")
        fut.add_done_callback(self._unkey)
        return fut

    def _unkey(self, fut: Future[Any]) -> None:
        got = self._keyed.get(fut.id)
        if got is not None and got[0] is fut:
            self._keyed.pop(fut.id, None)

    def _token(self, fut: Future[Any]) -> str:
        """The reply token ``fut`` is pending under: its id's tail, unless the caller chose the id."""
        got = self._keyed.get(fut.id)
        if got is not None and got[0] is fut:
            return got[1]
        return fut.id.rpartition("-")[2]

    def _unpend(self, fut: Future[Any]) -> None:
        """Take ``fut`` out of ``pending`` (only it: a finished keyed future's id tail may be another's token)."""
        token = self._token(fut)
        if self.pending.get(token) is fut:
            self.pending.pop(token, None)

    def _start(self, fut: Future[Any], token: str, meta: env.CallMeta, headers: dict[str, str], data: bytes,
               enc: _CallEncoder, policy: RetryPolicy, args: Any, kwargs: Any) -> None:
        """Route it, register its future (and what a retry needs), then send it or wait for its arguments."""
        self.counters["calls"] += 1
        subject = self.route(fut.actor, meta.session)
        if fut._span is not None:
            fut._span.set_attribute("messaging.destination.name", subject)
        reply = self._reply_prefix + token
        self.pending[token] = fut
        if self.closed:  # closed while we were building it
            self._fail(fut, Cancelled("the runtime closed", actor=fut.actor, method=fut.method, future_id=fut.id))
            return
        if policy.retries:
            fut._retry = _Retry(policy, subject, args, kwargs or None, headers, reply, meta.deadline)
        if enc.deps:
            self._after_deps(fut, enc.deps, enc.marks, env.Template(data, enc.n_bytes), subject, headers, reply,
                             meta.deadline)
        elif self.on_loop():
            fut._wk = self._wheel.add(meta.deadline, fut)
            self._send_call(fut, subject, data, headers, reply)
        else:
            self.post(self._submit, fut, meta.deadline, subject, data, headers, reply)

    def _meta(self, fut: Future[Any], scope: CallScope | None, session: Any, timeout: float | None,
              priority: int | None, retries: bool, traced: bool) -> env.CallMeta | None:
        """The call's headers as a record: its own settings and what it inherits from the calling scope.

        ``None`` when the call fails at once (``fut`` is failed): its scope is closed, or it would wait
        for itself. A bad session id raises ``ValueError``. ``attempt`` 0 asks the executor to
        acknowledge the call if it holds it long (the caller retries); the ``traceparent`` stand-in lets
        the size check count the real one, which ``_trace_call`` writes (same length).
        """
        now = time.time()
        deadline = now + (check_timeout(timeout) if timeout is not None else self.default_timeout)
        if scope is not None:
            m = self._child_meta(fut, scope, session, deadline, priority, retries, traced, now)
            if m is not None and self.table.order:  # program-level scheduling: its program's service so far
                m.svc = scope.svc
                fut._svc = (scope, scope.svc)
            return m
        return env.CallMeta(fut.id, "", _session_id(session), None, deadline, int(priority) if priority else 0,
                            0 if retries else -1, 0, int(now * 1_000_000), None,
                            _TRACEPARENT_SIZED if traced else None)

    @staticmethod
    def _child_meta(fut: Future[Any], scope: CallScope, session: Any, deadline: float, priority: int | None,
                    retries: bool, traced: bool, now: float) -> env.CallMeta | None:
        """A child call: in its scope's request, capped by its deadline, counted among its children,
        in its session and at its priority unless it names its own."""
        if scope.closed:  # a cancelled or expired call may not start new work
            fut._finish(FAILED, Cancelled("the calling method was cancelled or its deadline passed", actor=fut.actor,
                                          method=fut.method, future_id=fut.id))
            return None
        if session is _INHERIT:
            session = scope.session
        if priority is None:
            priority = scope.priority
        children = scope.children
        if children is None:
            children = scope.children = [fut]
        else:
            children.append(fut)
        if scope.holds_unit and fut.actor == scope.actor and session == scope.session:
            fut._finish(FAILED, BadRequest(
                f"{fut.actor}.{fut.method}: a stateful call may not call its own actor in its own session "
                "(the session's calls run one at a time, so it would wait for itself)", actor=fut.actor,
                method=fut.method, future_id=fut.id))
            return None
        if scope.deadline and scope.deadline < deadline:
            deadline = scope.deadline
        return env.CallMeta(fut.id, scope.request, _session_id(session), scope.id, deadline,
                            int(priority) if priority else 0, 0 if retries else -1, scope.stage + len(children),
                            scope.born or int(now * 1_000_000), None, _TRACEPARENT_SIZED if traced else None)

    def _send_call(self, fut: Future[Any], subject: str, data: bytes, headers: dict[str, str], reply: str) -> None:
        """Publish (loop thread); a call that may be retried also gets its liveness check armed."""
        r = fut._retry
        if r is not None:
            if not r.first:
                r.first = time.monotonic()
            r.rk = self._attempts.add(time.time() + r.policy.attempt_timeout, fut)
        self.send(subject, data, headers, reply)

    def _submit(self, fut: Future[Any], deadline: float, subject: str, data: bytes | None,
                headers: dict[str, str], reply: str) -> None:
        if fut._state != PENDING:
            return
        fut._wk = self._wheel.add(deadline, fut)
        if data is not None:
            self._send_call(fut, subject, data, headers, reply)

    def _after_deps(self, fut: Future[Any], deps: list[Future[Any]], marks: list[bytes], body: env.Template,
                    subject: str, headers: dict[str, str], reply: str, deadline: float) -> None:
        """The call waits (here, at its creator) until every future argument has its value.

        Its body was encoded once, with ``marks[i]`` where ``deps[i]`` goes: their values are spliced in.
        """
        failed = next((d for d in deps if d._state == FAILED), None)
        if failed is not None:
            self._fail_dep(fut, failed)
            return
        left = [len(deps)]
        self.post(self._submit, fut, deadline, subject, None, headers, reply)  # arm the deadline
        wspan = [self._trace_wait(fut, deps)] if fut._span is not None else None

        def end_wait(err: Any = None) -> None:  # once (list.pop is atomic): deps may finish on other threads
            try:
                span = wspan.pop()  # type: ignore[union-attr]
            except IndexError:
                return
            if isinstance(err, BaseException):
                tracing.record_exception(span, err)
            span.end()

        def on_dep(d: Future[Any]) -> None:
            if fut._state != PENDING:
                if wspan:
                    end_wait()
                return
            if d._state == FAILED:
                if wspan:
                    end_wait(d._value)
                self._fail_dep(fut, d)
                return
            with _LOCK:
                left[0] -= 1
                last = left[0] == 0
            if last:
                if wspan:
                    end_wait()
                try:
                    data = body.fill([(m, d._value) for m, d in zip(marks, deps)])
                    env.check_size(data, headers, self.transport.max_payload, f"the call {fut.actor}.{fut.method}")
                except (TypeError, PayloadTooLarge) as e:
                    self._fail(fut, BadRequest(str(e), actor=fut.actor, method=fut.method, future_id=fut.id,
                                               type=type(e).__name__))
                    return
                self.post(self._send_call, fut, subject, data, headers, reply)

        if wspan:  # cancelled or expired while it waited
            fut.add_done_callback(lambda _f: end_wait())
        for d in deps:
            d.add_done_callback(on_dep)

    @staticmethod
    def _trace_wait(fut: Future[Any], deps: list[Future[Any]]) -> Any:
        """The span of a call's wait for its argument futures: from its creation until it is sent."""
        return tracing.TRACER.start_span(
            f"wait dependencies {fut.actor}.{fut.method}", context=tracing.context_of(fut._span.span),
            attributes={"nalar.future_id": fut.id, "nalar.dependencies": len(deps),
                        "nalar.dependency_ids": [d.id for d in deps][:64]})

    def _fail_dep(self, fut: Future[Any], dep: Future[Any]) -> None:
        err = dep._value
        chain = [err.to_wire()] + list(err.chain) if isinstance(err, RemoteError) else []
        self._fail(fut, DependencyFailed(f"argument future {dep.id} failed: {err}", actor=fut.actor, method=fut.method,
                                         chain=chain, future_id=fut.id, type=type(err).__name__))

    def _fail(self, fut: Future[Any], err: BaseException) -> bool:
        """Fail a future that never got a reply: out of ``pending`` and off the deadline wheel."""
        self._unpend(fut)
        if fut._wk or fut._retry is not None:
            if self.on_loop():
                self._disarm(fut)
            elif self.loop is not None and not self.closed:
                self.post(self._disarm, fut)
        return fut._finish(FAILED, err)

    def _disarm(self, fut: Future[Any]) -> None:
        if fut._wk:
            self._wheel.discard(fut._wk, fut)
        r = fut._retry
        if r is not None:
            if r.rk:
                self._attempts.discard(r.rk, fut)
            fut._retry = None

    def _trace_call(self, fut: Future[Any], scope: CallScope | None, headers: dict[str, str],
                    meta: env.CallMeta) -> None:
        from opentelemetry.trace import SpanKind

        ctx = scope.otel_ctx if scope is not None else None
        attrs = tracing.call_attributes(fut.actor, fut.method, "", meta)  # the subject: ``_start`` routes it
        attrs["nalar.caller"] = self.name
        span = tracing.TRACER.start_span(f"call {fut.actor}.{fut.method}", context=ctx, kind=SpanKind.CLIENT,
                                         attributes=attrs)
        fut._span = tracing.CallSpan(span, fut)
        headers[env.H_TRACEPARENT] = tracing.traceparent(span)

    # -- replies, deadlines, cancellation -------------------------------------------------------
    def _on_reply(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        token = subject[self._plen:]
        if token == "ack":
            self._on_ack(data)
            return
        if headers is not None and env.H_CHUNK in headers:
            self._on_item(token, data, headers[env.H_CHUNK])
            return
        fut = self.pending.pop(token, None)
        if fut is None:  # a control request's; or late (after a deadline or cancel), or not a reply at all
            if token[:1] == "q":  # ``request``/``scatter``: any body (metrics, acks...), the handler decodes it
                on = self._requests.get(token)
                if on is not None:
                    on(data, headers)
                else:  # it has ended
                    self.counters["late_replies"] += 1
                return
            try:
                env.decode_reply(data)
                self.counters["late_replies"] += 1
            except MalformedMessage:
                self.count_malformed("reply")
            return
        if fut._svc is not None and headers:
            _served(fut, headers.get(env.H_SVC))
        r = fut._retry
        if not data and headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
            if r is not None and r.subject != self.subjects.call(fut.actor):  # its routed node is gone
                r.subject = self.subjects.call(fut.actor)
                r.attempt -= 1  # not the executor's fault: this does not use up an attempt
            # a node that served it lately may be restarting: look again for as long as the policy allows;
            # an actor no node has served lately (a typo?) gets a few seconds, in case one is starting
            known = r is not None and (self.served_within(fut.actor, r.policy.give_up_after)
                                       or time.monotonic() - r.first < LIVENESS_TIMEOUT)
            if r is not None and known and self._retry_later(fut, token):
                return
            looked = f" (looked for {time.monotonic() - r.first:.1f} s)" if r is not None and r.first else ""
            why = f"no node serves actor {fut.actor!r} in namespace {self.subjects.ns!r}{looked}"
            self._disarm(fut)
            fut._finish(FAILED, self._outcome_unknown(fut, why) if r is not None and r.unknown else UnknownActor(
                why + "; the call did not run", actor=fut.actor, method=fut.method, future_id=fut.id))
            return
        try:
            ok, value = env.decode_reply(data)
            if not ok:
                value = from_wire(value)
        except Exception as e:  # MalformedMessage, or anything odd: the future must still resolve
            self.count_malformed("reply")
            self._disarm(fut)
            fut._finish(FAILED, BadRequest(f"malformed reply: {e}", actor=fut.actor, method=fut.method,
                                           future_id=fut.id, type="MalformedMessage"))
            return
        if not ok and r is not None and (value.kind in _RETRYABLE_KINDS or
                                         (r.policy.retry_errors and value.kind == "error")):
            if self._retry_later(fut, token):
                return
            if r.unknown and value.kind == "unavailable":  # an earlier attempt, unanswered, may have run
                value = self._outcome_unknown(fut, value.message)
        self._disarm(fut)
        if ok and headers is not None and env.H_STREAM in headers:  # a stream's end: its count says what was sent
            with _LOCK:
                items = fut._items
                if items is None:
                    items = fut._items = Items()
                items.stream = True
            if value != items.next:
                ok, value = False, Unavailable(
                    f"the stream ended with {value!r} items sent but {items.next} arrived (NATS dropped some for "
                    "a slow consumer?)", actor=fut.actor, method=fut.method, future_id=fut.id)
        fut._finish(DONE if ok else FAILED, value)

    def _on_item(self, token: str, data: bytes, seq: str) -> None:
        """One item of a streaming call: kept in order for its reader; a repeat is dropped, a gap fails it."""
        fut = self.pending.get(token)
        if fut is None:
            self.counters["late_replies"] += 1
            return
        try:
            n = int(seq)
            ok, value = env.decode_reply(data)
            if not ok:
                raise MalformedMessage("a stream's item must be a value, not an error")
        except (ValueError, MalformedMessage):
            self.count_malformed("reply")
            return
        r = fut._retry
        if r is not None:
            r.streamed = True
        with _LOCK:
            items = fut._items
            if items is None:
                items = fut._items = Items()
            items.stream = True
            expected = items.next
            if n == expected:
                items.buf.append(value)
                items.next += 1
        if n == expected:
            items.wake()
        elif n > expected:
            self.counters["stream_gaps"] = self.counters.get("stream_gaps", 0) + 1
            self.cancel_with(fut, Unavailable(
                f"items {expected}..{n - 1} of the stream did not arrive (NATS dropped them for a slow "
                "consumer?); the call was cancelled", actor=fut.actor, method=fut.method, future_id=fut.id))

    # -- retries ------------------------------------------------------------------------------------
    def _on_heartbeat(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        node = subject.rpartition(".")[2]
        try:
            body = env.decode_json_object(data, "heartbeat")
            boot = body.get("boot")
            if body.get("node") != node or not isinstance(boot, str):
                raise MalformedMessage("heartbeat must be {'node': its name, 'boot': its boot id}")
        except MalformedMessage:
            self.count_malformed("heartbeat")
            return
        self.node_seen[node] = (time.monotonic(), boot)
        actors = body.get("actors")
        if isinstance(actors, list) and len(actors) <= 4096:
            known = self.node_actors.get(node)
            if known is None or len(known) != len(actors) or not known.issuperset(actors):
                self.node_actors[node] = frozenset(a for a in actors if isinstance(a, str))

    def _on_ack(self, data: bytes) -> None:
        try:
            body = env.decode_json_object(data, "ack")
            node, boot, ids = body.get("node"), body.get("boot"), body.get("ids")
            if not isinstance(node, str) or not isinstance(boot, str) or not isinstance(ids, list):
                raise MalformedMessage("ack body must be {'node': name, 'boot': id, 'ids': [tokens]}")
        except MalformedMessage:
            self.count_malformed("ack")
            return
        seen = self.node_seen.get(node)
        if seen is None or seen[1] != boot:
            self.node_seen[node] = (time.monotonic(), boot)
        for tok in ids:
            fut = self.pending.get(tok) if isinstance(tok, str) else None
            if fut is not None and fut._retry is not None:
                fut._retry.node = node
                fut._retry.boot = boot

    def _check_attempt(self, fut: Future[Any]) -> None:
        """The attempt's time is up: keep waiting if a live node holds it, else send it again."""
        r = fut._retry
        if fut._state != PENDING or r is None:
            return
        timeout = r.policy.attempt_timeout
        seen = self.node_seen.get(r.node) if r.node is not None else None
        if seen is not None and seen[1] == r.boot and time.monotonic() - seen[0] < timeout:
            r.rk = self._attempts.add(time.time() + timeout, fut)  # a live node (same boot) holds it
            return
        r.unknown = True
        attempts, took = r.attempt + 1, time.monotonic() - r.first
        if not self._retry_later(fut, self._token(fut)):
            self._fail(fut, self._outcome_unknown(
                fut, f"no executor answered in {attempts} attempt{'s' if attempts > 1 else ''} over {took:.1f} s"))

    @staticmethod
    def _outcome_unknown(fut: Future[Any], why: str) -> Unavailable:
        """Giving up on a call that may have run: say so, and name the key that learns its outcome."""
        return Unavailable(f"{why}; the outcome is unknown (it may have run): call again with key={fut.id!r} "
                           "to learn it", actor=fut.actor, method=fut.method, future_id=fut.id)

    def _retry_later(self, fut: Future[Any], token: str) -> bool:
        """Schedule the next attempt (same future id) after the back-off; False if none is left: the
        attempts are spent, or it would start ``give_up_after`` seconds after the first or past the deadline."""
        r = fut._retry
        if r is None or self.closed:
            return False
        p = r.policy
        if r.streamed or (p.attempts is not None and r.attempt + 1 >= p.attempts):
            return False
        delay = p.delay(r.attempt + 1)
        if time.monotonic() + delay - r.first > p.give_up_after or time.time() + delay >= r.deadline:
            return False
        r.attempt += 1
        r.node = None
        if r.rk:  # the previous attempt's liveness check must not fire on this one
            self._attempts.discard(r.rk, fut)
            r.rk = 0
        r.headers = dict(r.headers, **{env.H_ATTEMPT: str(r.attempt)})
        self.pending[token] = fut
        self.counters["retries"] = self.counters.get("retries", 0) + 1
        assert self.loop is not None
        self.loop.call_later(delay, self._resend, fut)
        return True

    def _resend(self, fut: Future[Any]) -> None:
        r = fut._retry
        if fut._state != PENDING or r is None or self.closed:
            return
        # it was sent only once its future arguments had values, so they all encode as those values
        data = env.encode_call(fut.method, r.args, r.kwargs or {}, _CallEncoder())
        if r.subject != self.subjects.call(fut.actor):  # routed: the route may have moved
            r.subject = self.route(fut.actor, r.headers.get(env.H_SESSION))
        self._send_call(fut, r.subject, data, r.headers, r.reply)

    def _expire(self, fut: Future[Any]) -> None:
        if fut._state != PENDING:
            return
        self._unpend(fut)
        self._disarm(fut)
        fut._finish(FAILED, DeadlineExceeded(
            f"the call's deadline passed before its answer came; if a node had it, its outcome is unknown "
            f"(it may have run): call again with key={fut.id!r} to learn it", actor=fut.actor,
            method=fut.method, future_id=fut.id))
        self.send(self.subjects.cancel, env.dumps({"ids": [fut.id]}))

    def cancel(self, fut: Future[Any]) -> bool:
        """Fail the future as cancelled here and tell every node to stop its work (and its children)."""
        return self.cancel_with(fut, Cancelled("cancelled by caller", actor=fut.actor, method=fut.method,
                                               future_id=fut.id))

    def cancel_with(self, fut: Future[Any], err: BaseException) -> bool:
        """Fail the future with ``err`` here and tell every node to stop its work (and its children)."""
        ok = self._fail(fut, err)
        if ok and not self.closed:
            body = env.dumps({"ids": [fut.id]})
            if self.on_loop():
                self.send(self.subjects.cancel, body)
            else:
                self.post(self.send, self.subjects.cancel, body)
        return ok

    # -- control requests (not calls), over the same reply subscription ----------------------------
    async def request(self, subject: str, body: dict[str, Any] | bytes, timeout: float = 30.0) -> Any:
        """One control request/reply (not a call): the reply's value.

        Raises the ``RemoteError`` the responder answered with (its subclass from the error's kind),
        ``UnknownActor`` if nobody listens on ``subject`` (NATS's no-responders answer),
        ``MalformedMessage`` if the answer is not a reply, and ``asyncio.TimeoutError`` if none came
        within ``timeout`` seconds.
        """
        got: list[tuple[bytes, dict[str, str] | None]] = []

        def on(data: bytes, headers: dict[str, str] | None) -> bool:
            got.append((data, headers))
            return True

        await self.scatter(subject, body, on, timeout)
        if not got:
            raise asyncio.TimeoutError(f"no reply on {subject} within {timeout:g} s")
        data, headers = got[0]
        if is_no_responders(data, headers):
            raise UnknownActor(f"nobody listens on {subject}", type="NoResponders")
        ok, value = env.decode_reply(data)
        if not ok:
            raise from_wire(value)
        return value

    async def scatter(self, subject: str, body: dict[str, Any] | bytes,
                      on: Callable[[bytes, dict[str, str] | None], bool | None], timeout: float,
                      quiet: float | None = None) -> None:
        """Publish one control message and hand every reply to it to ``on(data, headers)``.

        The replies come on the runtime's reply subscription (token ``q<n>``), not on an inbox of their
        own. It returns when ``on`` returns True, after ``timeout`` seconds, or, with ``quiet``, once
        no reply came for ``quiet`` seconds after the first one ``on`` counted (it returns False for a
        reply it counts, ``None`` for one it ignores, such as a malformed one); replies after that are counted as
        ``late_replies``. ``on`` sees every reply raw, headers included (``Nalar-Seq`` of a transfer,
        say); NATS's answer when nobody listens on ``subject`` is one too: empty data with
        ``Status: 503`` (``is_no_responders``), and the only one. An exception in ``on`` ends it and
        is raised here. Call it on the runtime's loop.
        """
        token = self._new_token("q")
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] | None = None
        heard = False
        ended = False
        error: BaseException | None = None

        def handler(data: bytes, headers: dict[str, str] | None) -> None:
            nonlocal heard, ended, error
            try:
                got = on(data, headers)
                heard = heard or got is not None  # ``None``: a reply ``on`` did not count (malformed, say)
                ended = bool(got)
            except Exception as e:
                ended, error = True, e
            if ended:
                self._requests.pop(token, None)
            if wake is not None and not wake.done():
                wake.set_result(None)

        self._requests[token] = handler
        try:
            data = body if isinstance(body, bytes) else env.dumps(body)
            await self.transport.publish(subject, data, None, self._reply_prefix + token)
            end = loop.time() + timeout
            while not ended:
                left = end - loop.time()
                if left <= 0:
                    break
                wake = loop.create_future()
                try:
                    await asyncio.wait_for(wake, quiet if heard and quiet is not None and quiet < left else left)
                except asyncio.TimeoutError:
                    break  # quiet for ``quiet`` seconds, or ``timeout`` is up
        finally:
            self._requests.pop(token, None)
        if error is not None:
            raise error

    def ask(self, subject: str, data: bytes, headers: dict[str, str] | None,
            timeout: float) -> "asyncio.Future[tuple[bytes, dict[str, str] | None]]":
        """One raw request over the runtime's reply subscription, sent with the batched publisher: a
        future of the answer's (data, headers), failing with ``asyncio.TimeoutError`` after ``timeout``.

        Far cheaper than a request of the client library (no inbox future, no ``wait_for``, no task),
        for hot paths that wait on a server's answer, like appending to a unit's log. Call it on the loop.
        """
        token = self._new_token("q")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[bytes, dict[str, str] | None]] = loop.create_future()
        requests = self._requests

        def handler(d: bytes, h: dict[str, str] | None) -> None:
            requests.pop(token, None)
            if not fut.done():
                fut.set_result((d, h))

        def expire() -> None:
            requests.pop(token, None)
            if not fut.done():
                fut.set_exception(asyncio.TimeoutError(f"no answer on {subject} within {timeout:g} s"))

        requests[token] = handler
        timer = loop.call_later(timeout, expire)
        fut.add_done_callback(lambda _: timer.cancel())
        self.send(subject, data, headers, self._reply_prefix + token)
        return fut

    def _new_token(self, kind: str) -> str:
        """A reply token: a counter for uniqueness, then 64 bits nobody can guess (a keyed hash of it),
        since a reply or a cancel needs the token, and a leaked future id must say nothing of the next.

        A keyed hash and not ``os.urandom``: that releases the GIL, and a caller's thread would hand the
        loop the GIL at every call.
        """
        n = next(self._qids if kind else self._ids)
        tag = hashlib.blake2b(n.to_bytes(8, "little") + kind.encode(), key=self._token_key, digest_size=8)
        return f"{kind}{n:x}{tag.hexdigest()}"

    def count_malformed(self, where: str) -> None:
        self.malformed[where] = self.malformed.get(where, 0) + 1

    def _bad_reply(self, subject: str, reply: str) -> None:
        """A message that asked to be answered on something other than an inbox: dropped, counted."""
        n = self.malformed.get("reply", 0)
        self.malformed["reply"] = n + 1
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: heard of, without flooding the log
            log.warning("dropped a message on %s asking for its answer on %r: only inboxes (%s) are answered "
                        "(%d such so far)", subject, reply[:80], ", ".join(self.subjects.replies_ok()), n + 1)


class _CallEncoder(env.Encoder):
    """Also encodes futures: a finished one becomes its value, a pending one a dependency.

    A pending one encodes as a placeholder unique to this call (``marks``: their encoded forms, one
    per entry of ``deps``), for ``Template.fill`` to splice its value into once it has one.
    """

    __slots__ = ("deps", "marks", "_nonce")

    def __init__(self) -> None:
        self.n_bytes = 0
        self.deps: list[Future[Any]] = []  # ``marks`` and ``_nonce`` exist once this is not empty

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, Future):
            if obj._state == DONE:
                return obj._value
            deps = self.deps
            if not deps:
                self.marks: list[bytes] = []
                self._nonce = secrets.token_hex(8)
            for i, d in enumerate(deps):  # the same future twice: one placeholder
                if d is obj:
                    return self.marks[i][1:-1].decode()
            mark = f"$nalar-future:{self._nonce}:{len(deps)}"
            deps.append(obj)
            self.marks.append(b'"' + mark.encode() + b'"')
            return mark
        return super().__call__(obj)


def _served(fut: Future[Any], raw: str | None) -> None:
    """A child answered with the service its subtree received: its caller's program has had that much
    more along this path (``CallScope.svc``)."""
    if raw is None:
        return
    try:
        got = env.parse_svc(raw)
    except ValueError:
        return  # a node of another version, or garbage: the order only loses precision
    scope, base = fut._svc
    fut._svc = None
    if base + got > scope.svc:
        scope.svc = min(env.MAX_SVC, base + got)
