"""One NATS connection per process: where to connect, with which credentials, and how to reconnect.

Settings come from arguments, else from the environment:

``NALAR_NATS_URL`` (comma-separated for a cluster), ``NALAR_NATS_TOKEN``, ``NALAR_NATS_USER`` and
``NALAR_NATS_PASSWORD``, ``NALAR_NATS_CREDS`` (a .creds file), ``NALAR_NATS_NKEY`` (an nkeys seed
file) or ``NALAR_NATS_NKEY_SEED`` (the seed itself, as docker-compose passes it), ``NALAR_NATS_TLS_CA`` / ``NALAR_NATS_TLS_CERT`` / ``NALAR_NATS_TLS_KEY``. Without a URL, the
``nalar up`` running on this machine is found through its discovery file. ``NALAR_CONNECT_TIMEOUT``
bounds a first connection (seconds, default 10): past it, or on any failure, one ``BusError`` names the
URL and the cause (the CLI sets it from ``--timeout``).

Without any credential in the environment, a process takes its role's credential from
``$NALAR_HOME/auth/<namespace>/<role>.nk`` if there is one (``nalar up`` and ``nalar auth init`` write
them), so every command on the machine of a ``nalar up`` connects as what it is: ``nalar node`` as a
node, ``nalar status`` as an operator, ``nalar.connect()`` as a client.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import math
import re
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

import nats.errors
from nats.aio.client import Client as NatsClient

from . import auth
from .discovery import find_running
from .errors import BusError
from .subjects import check_token

log = logging.getLogger("nalar.bus")
PERMISSIONS_ERR = "permissions violation"


@dataclass
class ConnectOptions:
    servers: list[str] = field(default_factory=list)
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds: str | None = None
    nkeys_seed: str | None = None
    nkeys_seed_str: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    name: str = "nalar"
    connect_timeout: float = 3.0
    namespace: str = "default"
    role: str = "client"
    #: Where the credential came from, for error messages ("" = none given).
    source: str = ""

    @classmethod
    def resolve(cls, url: str | None = None, *, role: str = "client", namespace: str = "default",
                **overrides: Any) -> "ConnectOptions":
        """Explicit URL, else ``NALAR_NATS_URL``, else the local ``nalar up``; error if none.

        Credentials: explicit ones, else those in the environment, else ``role``'s credential for
        ``namespace`` under ``$NALAR_HOME/auth`` (unless the local ``nalar up`` runs ``--insecure``).
        """
        env = os.environ
        url = url or env.get("NALAR_NATS_URL")
        running = None
        if not url:
            running = find_running()
            if running is None:
                raise BusError(
                    "no NATS server to connect to: start one with `nalar up`, or pass --nats URL / "
                    "set NALAR_NATS_URL"
                )
            url = running["url"]
        opts = cls(
            servers=[u.strip() for u in url.split(",") if u.strip()],
            token=env.get("NALAR_NATS_TOKEN"),
            user=env.get("NALAR_NATS_USER"),
            password=env.get("NALAR_NATS_PASSWORD"),
            creds=env.get("NALAR_NATS_CREDS"),
            nkeys_seed=env.get("NALAR_NATS_NKEY"),
            nkeys_seed_str=env.get("NALAR_NATS_NKEY_SEED") or None,
            tls_ca=env.get("NALAR_NATS_TLS_CA"),
            tls_cert=env.get("NALAR_NATS_TLS_CERT"),
            tls_key=env.get("NALAR_NATS_TLS_KEY"),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        opts.namespace = check_token(namespace, "namespace")
        opts.role = role
        if opts.has_credentials():
            opts.source = "the NALAR_NATS_* environment"
        elif not (running is not None and running.get("insecure")):
            found = auth.Credentials(auth.default_dir(namespace), namespace).for_role(role)
            if found is not None:
                opts.nkeys_seed = str(found)
                opts.source = str(found)
        return opts

    def has_credentials(self) -> bool:
        return bool(self.token or self.user or self.creds or self.nkeys_seed or self.nkeys_seed_str)

    def principal(self) -> str:
        """The token that names this connection's inbox: ``nalar.<ns>.r.<principal>.``.

        For an nkey or a .creds file it is derived from the public key (the server's permissions use
        the same); for a user it is the user name; without credentials (an open server) ``anon``.
        """
        override = os.environ.get("NALAR_PRINCIPAL")
        if override:
            return check_token(override, "NALAR_PRINCIPAL")
        if self.nkeys_seed_str:
            return auth.principal_from_seed(self.nkeys_seed_str)
        if self.nkeys_seed:
            return auth.principal_from_seed_file(self.nkeys_seed)
        if self.creds:
            return auth.principal_from_creds(self.creds)
        if self.user:
            return check_token(self.user, "NATS user name (the token of its reply subjects)")
        return "anon"

    def inbox_prefix(self) -> str:
        """nats-py's own inboxes (JetStream API replies) live under this connection's reply prefix."""
        return f"nalar.{self.namespace}.r.{self.principal()}._i"

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert or any(s.startswith("tls://") for s in self.servers)):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


_WS = re.compile(rb"\s")


class _Client(NatsClient):
    """nats-py's client with a faster header parser (same rules).

    nats-py checks each header name for whitespace with a generator over its characters, which was
    the largest single cost of receiving a call; a compiled regex does the same check in C.

    ``denied`` keeps the server's last refusals (publishes and subscriptions its permissions do not
    allow): the server drops what it refuses and says so only on this connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.denied: deque[str] = deque(maxlen=100)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip()
            if not name or _WS.search(name):
                continue
            try:
                key = name.decode("ascii")
            except UnicodeDecodeError:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


async def open_connection(opts: ConnectOptions, on_closed: Callable[[], None] | None = None,
                          timeout: float | None = None) -> NatsClient:
    """Connect, failing clearly if no server answers; once connected, reconnect forever.

    The first connection gets ``timeout`` seconds (default ``first_connect_timeout()``) in all, tries
    and back-off included; past it, or on any failure, a ``BusError`` names the URLs and the cause.
    """
    check_urls(opts.servers)  # a malformed URL is the caller's mistake: say so, without a network try
    budget = first_connect_timeout() if timeout is None else timeout
    nc = _Client()

    up = [False]
    first_errors: list[Exception] = []

    fatal = asyncio.Event()

    async def on_error(e: Exception) -> None:  # errors of the first attempt surface as one BusError
        if not up[0]:
            first_errors.append(e)
            # a rejected certificate or credential will not be accepted on a retry either
            if isinstance(e, (ssl.SSLError, nats.errors.AuthorizationError)):
                fatal.set()
        elif PERMISSIONS_ERR in str(e).lower():
            what = str(e).removeprefix("nats: ")
            if what not in nc.denied:
                log.warning("nats: the server's permissions refused this to the credential from %s (connected as "
                            "role %s, namespace %r): %s", opts.source or "the arguments", opts.role, opts.namespace,
                            what)
            nc.denied.append(what)
        elif not (nc.is_closed or nc.is_draining):
            log.warning("nats: %r", e)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats: disconnected from %s, reconnecting", ", ".join(opts.servers))

    async def on_reconnect() -> None:
        log.warning("nats: reconnected")

    async def on_close() -> None:
        if up[0] and on_closed is not None:
            on_closed()

    kwargs: dict[str, Any] = dict(
        servers=opts.servers,
        name=opts.name,
        connect_timeout=min(opts.connect_timeout, budget),  # one try never outlasts the budget
        allow_reconnect=True,
        max_reconnect_attempts=2,  # for the first connect; forever once connected (below)
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        closed_cb=on_close,
        pending_size=64 * 1024 * 1024,
        flush_timeout=10,
        inbox_prefix=opts.inbox_prefix(),
    )
    if opts.token:
        kwargs["token"] = opts.token
    if opts.user:
        kwargs["user"] = opts.user
        kwargs["password"] = opts.password
    if opts.creds:
        kwargs["user_credentials"] = opts.creds
    if opts.nkeys_seed_str:
        kwargs["nkeys_seed_str"] = opts.nkeys_seed_str
    elif opts.nkeys_seed:
        kwargs["nkeys_seed"] = opts.nkeys_seed
    tls = opts.tls_context()
    if tls is not None:
        kwargs["tls"] = tls
    # nats-py can hang after some first-connect failures (a TLS certificate it rejects, for one), so
    # the whole first attempt runs under the budget, whatever nats-py does inside it.
    connecting = asyncio.ensure_future(nc.connect(**kwargs))
    gave_up = asyncio.ensure_future(fatal.wait())
    try:
        await asyncio.wait({connecting, gave_up}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            if fatal.is_set():  # a refused certificate or credential: that is the cause, not the time
                raise first_errors[-1]
            raise asyncio.TimeoutError()
        connecting.result()
    except Exception as e:  # nats-py raises several types here; one clear message for all
        try:
            await asyncio.wait_for(nc.close(), 1.0)  # closing a half-made connection can hang too
        except Exception:
            pass
        if any(_refused(x) for x in (e, *first_errors)):
            raise BusError(_refused_message(opts)) from None
        raise BusError(f"cannot connect to NATS at {', '.join(opts.servers)}: "
                       f"{_causes(e, first_errors, budget, len(opts.servers) > 1)}") from e
    finally:
        gave_up.cancel()
    nc.options["max_reconnect_attempts"] = -1
    up[0] = True
    return nc


def _refused(e: BaseException) -> bool:
    return isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower()


def _refused_message(opts: ConnectOptions) -> str:
    where = ", ".join(opts.servers)
    if opts.has_credentials():
        return (f"NATS at {where} refused the credentials from {opts.source or 'the arguments'} (role "
                f"{opts.role}, namespace {opts.namespace!r}): they are not among the server's users. Use the "
                f"credentials of the deployment you connect to (`nalar auth show` where it runs lists them)")
    return (f"NATS at {where} requires credentials and none were given (role {opts.role}, namespace "
            f"{opts.namespace!r}). On the machine of a `nalar up` they are found by themselves in "
            f"{auth.default_dir(opts.namespace)}; elsewhere copy the role's seed file from there (or from "
            f"`nalar auth init --dir DIR`) and set NALAR_NATS_NKEY=/path/to/{opts.role}.nk "
            f"(or NALAR_NATS_CREDS / NALAR_NATS_USER and NALAR_NATS_PASSWORD)")


#: A first connection's budget in seconds when neither the caller nor ``NALAR_CONNECT_TIMEOUT`` sets one.
FIRST_CONNECT_TIMEOUT = 10.0
_SCHEMES = ("nats", "tls", "ws", "wss")
_ADDR = re.compile(r"\('([^']*)', (\d+)")


def first_connect_timeout() -> float:
    """``NALAR_CONNECT_TIMEOUT`` (finite seconds > 0), else ``FIRST_CONNECT_TIMEOUT``."""
    raw = os.environ.get("NALAR_CONNECT_TIMEOUT")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            return value
        log.warning("ignoring NALAR_CONNECT_TIMEOUT=%r (not a finite number > 0); using %g s", raw,
                    FIRST_CONNECT_TIMEOUT)
    return FIRST_CONNECT_TIMEOUT


def check_urls(servers: list[str]) -> None:
    """Refuse what nats-py would mangle or retry for nothing: ``http://h:1`` becomes ``nats://http://h:1``."""
    if not servers:
        raise BusError("no NATS URL given: expected nats://HOST:PORT (comma-separated for a cluster)")
    for url in servers:
        bad = f"bad NATS URL {url!r}: expected nats://HOST:PORT (or tls://, ws://, wss://)"
        if any(c.isspace() for c in url):
            raise BusError(bad)
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        try:
            parsed.port  # noqa: B018 - raises on a port that is not a number in 0-65535
        except ValueError as e:
            raise BusError(f"{bad}: {e}") from None
        if parsed.scheme not in _SCHEMES or not parsed.hostname:
            raise BusError(bad)
        if parsed.scheme in ("nats", "tls") and parsed.path not in ("", "/"):
            raise BusError(bad)


def _causes(e: BaseException, errors: list[Exception], budget: float, many: bool) -> str:
    """What went wrong, each cause once (with the addresses it happened at, for several URLs): a first
    connect makes several tries, often failing alike."""
    seen: list[BaseException] = [x for x in errors if not isinstance(x, nats.errors.NoServersError)]
    gave_up = ""
    if isinstance(e, asyncio.TimeoutError) and seen and not many:
        gave_up = f" (gave up after {budget:g} s)"  # the budget ended the retries: the errors say why
    elif isinstance(e, asyncio.TimeoutError) or not seen:
        seen.append(e)  # our budget ran out, or nats-py's own exception is the only word there is
    grouped: dict[tuple[str, str], list[str]] = {}
    for x in seen:
        if isinstance(x, nats.errors.NoServersError):
            continue
        head, tail = _cause(x, budget)
        where = grouped.setdefault((head, tail), [])
        m = _ADDR.search(str(x)) if many else None  # asyncio names the address it tried
        if m and f"{m.group(1)}:{m.group(2)}" not in where:
            where.append(f"{m.group(1)}:{m.group(2)}")
    texts = [head + (f" at {', '.join(where)}" if where else "") + tail for (head, tail), where in grouped.items()]
    return ("; ".join(texts) or "no server could be reached") + gave_up


def _cause(e: BaseException, budget: float) -> tuple[str, str]:
    """(what happened, why it may have): an address goes between the two."""
    codes = set(re.findall(r"\[Errno (\d+)\]", str(e))) if isinstance(e, OSError) else set()
    if isinstance(e, ConnectionRefusedError) or codes == {str(errno.ECONNREFUSED)}:  # also: every address of a name
        return "connection refused", " (nothing listens there: is the server running, on that port?)"
    if isinstance(e, socket.gaierror):
        return "cannot resolve the host name", f" ({e.strerror or e})"
    if isinstance(e, asyncio.TimeoutError):
        return (f"no NATS server answered within {budget:g} s", " (nothing responds at that address, or what "
                "accepts the connection does not speak NATS)")
    if isinstance(e, ssl.SSLError):
        detail = getattr(e, "verify_message", None)  # what was wrong with the certificate, if that was it
        return "TLS failed", f": {e.reason or e}{f' ({detail})' if detail else ''}"
    if isinstance(e, nats.errors.UnexpectedEOF):
        return "the server closed the connection during the handshake", " (is it a NATS server? does it want TLS?)"
    if isinstance(e, nats.errors.Error) and "expecting INFO" in str(e):
        return "what answered is not a NATS server", " (no INFO greeting)"
    if isinstance(e, OSError):
        return str(e.strerror or e), ""
    if isinstance(e, nats.errors.Error):
        return str(e).removeprefix("nats: "), ""
    return repr(e), ""
