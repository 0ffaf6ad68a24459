"""The per-process runtime: one bus connection, the table of pending futures, replies and deadlines.

Every process that makes calls has one: a client (``nalar.connect``), a node (which adds serving on
top), or local mode. It is driven by one asyncio loop; other threads (pykka actors, user threads) hand
work to it through ``post``, which wakes the loop once per burst rather than once per message.
"""
from __future__ import annotations

import asyncio
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
                          PayloadTooLarge, RemoteError, Unavailable, UnknownActor, error_from_dict)
from ..bus.subjects import Subjects
from ..bus.transport import NO_RESPONDERS, STATUS_HEADER, Transport
from .context import current_call
from .deadlines import DeadlineWheel
from .decisions import DecisionTable
from .future import _LOCK, DONE, FAILED, LOOP_THREADS, PENDING, Future
from .retry import DEFAULT_RETRY, HEARTBEAT_INTERVAL, RetryPolicy

DEFAULT_TIMEOUT = 300.0
#: Reserved for the ``traceparent`` header when checking a call's size before its span exists.
_TRACE_HEADER_RESERVE = 80
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

    __slots__ = ("policy", "attempt", "subject", "args", "kwargs", "headers", "reply", "node", "boot", "rk")

    def __init__(self, policy: RetryPolicy, subject: str, args: Any, kwargs: Any, headers: dict[str, str],
                 reply: str) -> None:
        self.policy = policy
        self.attempt = 0
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

    def __init__(self, transport: Transport, namespace: str = "default", name: str = "client") -> None:
        self.transport = transport
        self.subjects = Subjects(namespace)
        self.name = name
        self.proc = secrets.token_hex(4)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.pending: dict[str, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reply_prefix = self.subjects.reply_prefix(self.proc)
        self._plen = len(self._reply_prefix)
        self._out: deque[tuple[str, bytes, dict[str, str] | None, str]] = deque()
        self._draining = False
        self._drained: asyncio.Event | None = None
        self._posted: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._post_lock = threading.Lock()
        self._wheel = DeadlineWheel(self._expire)
        self._attempts = DeadlineWheel(self._check_attempt)  # when to ask "is my call's executor alive?"
        self.node_seen: dict[str, tuple[float, str]] = {}  # node -> (monotonic time of its last heartbeat, boot id)
        self._subs: list[Any] = []
        self.default_timeout = default_timeout()
        self.counters: dict[str, int] = {"calls": 0, "late_replies": 0}
        self.malformed: dict[str, int] = {}
        self.closed = False
        self.table = DecisionTable()  # the policy actor's decisions in force here
        #: Called with each applied batch's ops and its reply subject (a node enforces them locally).
        self.on_decisions: Callable[[list[Any], str], None] | None = None
        self._reloading = False

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
            f._finish(FAILED, Cancelled("Cancelled", "the runtime closed", f.actor, f.method, future_id=f.id))
        self.pending.clear()
        await self.transport.close()
        LOOP_THREADS.discard(self.loop_thread)

    def subscriptions(self) -> list[str]:
        return [self._reply_prefix + "*", self.subjects.heartbeat("*"), self.subjects.policy]

    # -- decisions ---------------------------------------------------------------------------------
    async def load_decisions(self) -> None:
        """Take the decisions in force from the policy actor's snapshot (none yet, or no JetStream: none)."""
        nc = getattr(self.transport, "nc", None)
        if nc is None:
            return
        from ..bus import kv as bkv

        try:
            kv = await asyncio.wait_for(bkv.open_bucket(nc, bkv.policy_bucket(self.subjects.ns), "policy decisions",
                                                        create=False), 5)
            got = await asyncio.wait_for(bkv.get(kv, bkv.POLICY_KEY), 5) if kv is not None else None
        except Exception as e:  # no JetStream, say: serving goes on; the next broadcast brings decisions
            log.debug("could not read the policy's decisions: %r", e)
            return
        if got is None:
            return
        try:
            msg = env.decode_json_object(got[0], "policy snapshot")
            if isinstance(msg.get("v"), int) and msg["v"] > self.table.version:
                ops = self.table.apply(dict(msg, full=True))
                if ops and self.on_decisions is not None:
                    self.on_decisions(ops, "")
        except MalformedMessage as e:
            self.count_malformed("policy")
            log.warning("ignoring a malformed policy snapshot: %s", e)

    def _on_policy(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            msg = env.decode_json_object(data, "decisions")
            ops = self.table.apply(msg)
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
        return seen is not None and time.monotonic() - seen[0] < 3 * HEARTBEAT_INTERVAL

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
             retry: RetryPolicy | None = None) -> Future[Any]:
        """Create the future and send the call; returns at once. Non-JSON arguments raise ``TypeError``."""
        if self.closed or self.transport.closed:
            raise BusError("this nalar runtime is closed (or lost its NATS connection for good)")
        n = next(self._ids)
        token = f"{n:x}"
        fid = f"{self.proc}-{token}"
        fut: Future[Any] = Future(fid, actor, method, self)
        parent = current_call.get()
        now = time.time()
        deadline = now + (check_timeout(timeout) if timeout is not None else self.default_timeout)
        headers = {env.H_ID: fid}
        if parent is not None:
            if parent.done:  # a cancelled or expired call may not start new work
                fut._finish(FAILED, Cancelled("Cancelled", "the calling method was cancelled or its deadline "
                                              "passed", actor, method, future_id=fid))
                return fut
            if parent.deadline and parent.deadline < deadline:
                deadline = parent.deadline
            headers[env.H_REQ] = parent.request
            headers[env.H_PARENT] = parent.id
            if session is _INHERIT:
                session = parent.session
            if priority is None and parent.priority:
                priority = parent.priority
            if parent.children is None:
                parent.children = [fut]
            else:
                parent.children.append(fut)
            headers[env.H_STAGE] = str(parent.stage + len(parent.children))
        headers[env.H_BORN] = str(parent.born) if parent is not None and parent.born else str(int(now * 1_000_000))
        headers[env.H_DEADLINE] = f"{deadline:.3f}"
        if parent is not None and parent.unit and actor == parent.group.name and session == parent.session:
            fut._finish(FAILED, BadRequest(
                "BadRequest", f"{actor}.{method}: a stateful call may not call its own actor in its own session "
                "(the session's calls run one at a time, so it would wait for itself)", actor, method, future_id=fid))
            return fut
        if session is not _INHERIT and session is not None:
            session = str(session)
            if len(session) > env.MAX_SESSION_LEN or "\n" in session or "\r" in session:
                raise ValueError(f"a session id is one line of at most {env.MAX_SESSION_LEN} characters")
            headers[env.H_SESSION] = session
        if priority:
            headers[env.H_PRIORITY] = str(int(priority))
        policy = DEFAULT_RETRY if retry is None else retry
        if policy.attempts > 1:
            headers[env.H_ATTEMPT] = "0"  # asks the executor to acknowledge it if it holds it long

        enc = _DepEncoder()
        data = env.encode_call(method, args, kwargs, enc)
        deps = enc.deps
        limit = self.transport.max_payload
        if limit:
            env.check_size(data, headers, limit - _TRACE_HEADER_RESERVE, f"the call {actor}.{method}")
        if tracing.TRACER is not None:
            self._trace_call(fut, parent, headers)
        self.counters["calls"] += 1
        subject = self.route(actor, session if isinstance(session, str) else None)
        reply = self._reply_prefix + token
        self.pending[token] = fut
        if self.closed:  # closed while we were building it
            self._fail(fut, Cancelled("Cancelled", "the runtime closed", actor, method, future_id=fid))
            return fut
        if policy.attempts > 1:
            fut._retry = _Retry(policy, subject, args, kwargs or None, headers, reply)
        if deps:
            self._after_deps(fut, deps, subject, method, args, kwargs, headers, reply, deadline)
        elif self.on_loop():
            fut._wk = self._wheel.add(deadline, fut)
            self._send_call(fut, subject, data, headers, reply)
        else:
            self.post(self._submit, fut, deadline, subject, data, headers, reply)
        return fut

    def _send_call(self, fut: Future[Any], subject: str, data: bytes, headers: dict[str, str], reply: str) -> None:
        """Publish (loop thread); a call that may be retried also gets its liveness check armed."""
        r = fut._retry
        if r is not None:
            r.rk = self._attempts.add(time.time() + r.policy.attempt_timeout, fut)
        self.send(subject, data, headers, reply)

    def _submit(self, fut: Future[Any], deadline: float, subject: str, data: bytes | None,
                headers: dict[str, str], reply: str) -> None:
        if fut._state != PENDING:
            return
        fut._wk = self._wheel.add(deadline, fut)
        if data is not None:
            self._send_call(fut, subject, data, headers, reply)

    def _after_deps(self, fut: Future[Any], deps: list[Future[Any]], subject: str, method: str,
                    args: Any, kwargs: Any, headers: dict[str, str], reply: str, deadline: float) -> None:
        """The call waits (here, at its creator) until every future argument has its value."""
        failed = next((d for d in deps if d._state == FAILED), None)
        if failed is not None:
            self._fail_dep(fut, failed)
            return
        left = [len(deps)]
        self.post(self._submit, fut, deadline, subject, None, headers, reply)  # arm the deadline

        def on_dep(d: Future[Any]) -> None:
            if fut._state != PENDING:
                return
            if d._state == FAILED:
                self._fail_dep(fut, d)
                return
            with _LOCK:
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    data = env.encode_call(method, args, kwargs, _DepEncoder())
                    env.check_size(data, headers, self.transport.max_payload, f"the call {fut.actor}.{fut.method}")
                except (TypeError, PayloadTooLarge) as e:
                    self._fail(fut, BadRequest(type(e).__name__, str(e), fut.actor, fut.method, future_id=fut.id))
                    return
                self.post(self._send_call, fut, subject, data, headers, reply)

        for d in deps:
            d.add_done_callback(on_dep)

    def _fail_dep(self, fut: Future[Any], dep: Future[Any]) -> None:
        err = dep._value
        chain = [err.to_dict()] + list(err.chain) if isinstance(err, RemoteError) else []
        self._fail(fut, DependencyFailed(type(err).__name__, f"argument future {dep.id} failed: {err}",
                                         fut.actor, fut.method, chain=chain, future_id=fut.id))

    def _fail(self, fut: Future[Any], err: BaseException) -> bool:
        """Fail a future that never got a reply: out of ``pending`` and off the deadline wheel."""
        self.pending.pop(fut.id.rpartition("-")[2], None)
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

    def _trace_call(self, fut: Future[Any], parent: Any, headers: dict[str, str]) -> None:
        from opentelemetry.trace import SpanKind

        ctx = parent.otel_ctx if parent is not None and parent.otel_ctx is not None else None
        span = tracing.TRACER.start_span(f"call {fut.actor}.{fut.method}", context=ctx, kind=SpanKind.CLIENT,
                                         attributes={"nalar.future": fut.id, "nalar.actor": fut.actor,
                                                     "nalar.method": fut.method})
        fut._span = span
        headers[env.H_TRACEPARENT] = tracing.traceparent(span)

    # -- replies, deadlines, cancellation -------------------------------------------------------
    def _on_reply(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        token = subject[self._plen:]
        if token == "ack":
            self._on_ack(data)
            return
        fut = self.pending.pop(token, None)
        if fut is None:  # late (after a deadline or cancel), or not a reply at all
            try:
                env.decode_reply(data)
                self.counters["late_replies"] += 1
            except MalformedMessage:
                self.count_malformed("reply")
            return
        r = fut._retry
        if not data and headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
            if r is not None and r.subject != self.subjects.call(fut.actor):  # its routed node is gone
                r.subject = self.subjects.call(fut.actor)
                r.attempt -= 1  # not the executor's fault: this does not use up an attempt
            if r is not None and self._retry_later(fut, token):
                return  # none serves it right now (a node reconnecting or restarting?): look again shortly
            self._disarm(fut)
            fut._finish(FAILED, UnknownActor(
                "UnknownActor", f"no node serves actor {fut.actor!r} in namespace {self.subjects.ns!r}",
                fut.actor, fut.method, future_id=fut.id))
            return
        try:
            ok, value = env.decode_reply(data)
            if not ok:
                value = error_from_dict(value)
        except Exception as e:  # MalformedMessage, or anything odd: the future must still resolve
            self.count_malformed("reply")
            self._disarm(fut)
            fut._finish(FAILED, BadRequest("MalformedMessage", f"malformed reply: {e}", fut.actor, fut.method,
                                           future_id=fut.id))
            return
        if not ok and r is not None and (value.kind in _RETRYABLE_KINDS or
                                         (r.policy.retry_errors and value.kind == "error")):
            if self._retry_later(fut, token):
                return
        self._disarm(fut)
        fut._finish(DONE if ok else FAILED, value)

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
        token = fut.id.rpartition("-")[2]
        if not self._retry_later(fut, token):
            self._fail(fut, Unavailable("Unavailable", f"no executor answered after {r.attempt + 1} attempts "
                                                       f"of {timeout:g} s each", fut.actor, fut.method,
                                        future_id=fut.id))

    def _retry_later(self, fut: Future[Any], token: str) -> bool:
        """Schedule the next attempt (same future id) after the back-off; False if none is left."""
        r = fut._retry
        if r is None or r.attempt + 1 >= r.policy.attempts or self.closed:
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
        self.loop.call_later(r.policy.delay(r.attempt), self._resend, fut)
        return True

    def _resend(self, fut: Future[Any]) -> None:
        r = fut._retry
        if fut._state != PENDING or r is None or self.closed:
            return
        data = env.encode_call(fut.method, r.args, r.kwargs or {}, _DepEncoder())  # it encoded once: it will again
        if r.subject != self.subjects.call(fut.actor):  # routed: the route may have moved
            r.subject = self.route(fut.actor, r.headers.get(env.H_SESSION))
        self._send_call(fut, r.subject, data, r.headers, r.reply)

    def _expire(self, fut: Future[Any]) -> None:
        if fut._state != PENDING:
            return
        self.pending.pop(fut.id.rpartition("-")[2], None)
        self._disarm(fut)
        fut._finish(FAILED, DeadlineExceeded("DeadlineExceeded", "the call's deadline passed", fut.actor,
                                             fut.method, future_id=fut.id))
        self.send(self.subjects.cancel, env.dumps({"ids": [fut.id]}))

    def cancel(self, fut: Future[Any]) -> bool:
        """Fail the future as cancelled here and tell every node to stop its work (and its children)."""
        ok = self._fail(fut, Cancelled("Cancelled", "cancelled by caller", fut.actor, fut.method, future_id=fut.id))
        if ok and not self.closed:
            body = env.dumps({"ids": [fut.id]})
            if self.on_loop():
                self.send(self.subjects.cancel, body)
            else:
                self.post(self.send, self.subjects.cancel, body)
        return ok

    async def transport_request(self, subject: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
        """One control request/reply (not a call): returns the value or raises ``RemoteError``."""
        inbox = self.subjects.inbox(self.proc, f"req{next(self._ids):x}")
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        def on(subj: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            if not got.done():
                if not data and headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
                    got.set_exception(UnknownActor("NoResponders", f"nobody listens on {subject}"))
                else:
                    got.set_result(data)

        sub = await self.transport.subscribe(inbox, on)
        try:
            await self.transport.publish(subject, env.dumps(body), None, inbox)
            data = await asyncio.wait_for(got, timeout)
        finally:
            await sub.unsubscribe()
        ok, value = env.decode_reply(data)
        if not ok:
            raise error_from_dict(value)
        return value

    def count_malformed(self, where: str) -> None:
        self.malformed[where] = self.malformed.get(where, 0) + 1


class _DepEncoder(env.Encoder):
    """Also encodes futures: a finished one becomes its value, a pending one a dependency."""

    __slots__ = ("deps",)

    def __init__(self) -> None:
        super().__init__()
        self.deps: list[Future[Any]] = []

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, Future):
            if obj._state == DONE:
                return obj._value
            self.deps.append(obj)
            return None
        return super().__call__(obj)
