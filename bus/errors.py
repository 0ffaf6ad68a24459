"""Errors that cross process boundaries.

They live at the bottom layer because the envelope codec turns them into bytes and back; every other
layer raises or catches them through ``nalar``'s public names. The wire form of an error has one home,
both directions: ``RemoteError.to_wire``/``from_wire`` for nalar's own, ``to_wire`` for what user code raised.

What crosses the wire names nothing of the host it came from: a traceback's frames are named relative
to the ``sys.path`` entry (or package) they were imported from (``wire_filename``), and every error
text goes through ``scrub``, which takes out what is left (paths, the home directory, URL credentials,
the host's name). The node's own log keeps the full detail.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import traceback as _tb
from typing import Any, Callable

import pykka


class NalarError(Exception):
    """Base of every error nalar raises itself."""


class BusError(NalarError):
    """The message bus cannot be reached or refused an operation."""


class ServerNotFound(BusError):
    """The ``nats-server`` binary is not installed where nalar looks for it."""


class PayloadTooLarge(NalarError, ValueError):
    """An encoded message is over the server's ``max_payload``."""

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(
            f"{what} is {size} bytes, over the NATS server's max_payload of {limit} bytes; "
            "send a reference (a key, a path) instead of the bytes, or raise max_payload"
        )
        self.size = size
        self.limit = limit


class MalformedMessage(NalarError, ValueError):
    """An incoming message failed validation at the edge."""


class Timeout(NalarError, pykka.Timeout, TimeoutError):
    """Waiting on a future took longer than the caller's ``timeout`` (the call itself goes on)."""


class RemoteError(NalarError):
    """A call failed on the remote side.

    Carries what the executor reported: the remote exception's type name, its message, where it ran
    (actor, method) and the remote traceback, plus ``chain``, the errors of the futures below it
    when it came from a nested call. ``to_wire``/``from_wire`` are its wire form, both directions here.
    """

    kind = "error"

    def __init__(
        self,
        type: str,
        message: str,
        actor: str = "",
        method: str = "",
        traceback: str = "",
        chain: list[dict[str, Any]] | None = None,
        future_id: str = "",
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.actor = actor
        self.method = method
        self.traceback = traceback
        self.chain = chain or []
        self.future_id = future_id

    def __str__(self) -> str:
        where = f"{self.actor}.{self.method}" if self.actor else "remote call"
        text = f"{where} raised {self.type}: {self.message}"
        if self.traceback:
            text += "\n--- remote traceback ---\n" + self.traceback.rstrip()
        return text

    def to_wire(self) -> dict[str, Any]:
        """The ``{"e": ...}`` part of a reply; ``from_wire`` reads it back (as this subclass, by ``kind``)."""
        return {
            "kind": self.kind,
            "type": self.type,
            "message": self.message,
            "actor": self.actor,
            "method": self.method,
            "traceback": self.traceback,
            "chain": self.chain,
            "future_id": self.future_id,
        }


class _Own(RemoteError):
    """A failure nalar itself reports: its ``type`` is the class name unless told otherwise (a
    ``BadRequest`` for a ``TypeError`` says ``type="TypeError"``).

    Everything but the message is keyword-only, so code written for the old form ``Cls(type, message)``
    fails loudly instead of sending its message as the actor's name.
    """

    def __init__(
        self,
        message: str,
        *,
        actor: str = "",
        method: str = "",
        traceback: str = "",
        chain: list[dict[str, Any]] | None = None,
        future_id: str = "",
        type: str | None = None,
    ) -> None:
        super().__init__(type or self.__class__.__name__, message, actor, method, traceback, chain, future_id)


class UnknownActor(_Own):
    """No node serves the actor that was called (answered at once by NATS' no-responders status)."""

    kind = "unknown_actor"


class UnknownMethod(_Own, AttributeError):
    """The actor exists but has no public method of that name."""

    kind = "unknown_method"


class BadRequest(_Own, ValueError):
    """The executor could not decode or validate the call."""

    kind = "bad_request"


class DeadlineExceeded(_Own, TimeoutError):
    """The call's deadline passed before it finished; the work was cancelled where it ran."""

    kind = "deadline"


class Cancelled(_Own):
    """The call was cancelled by its caller or by a cancelled parent."""

    kind = "cancelled"


class Overloaded(_Own):
    """The executor's queue is full: back off and retry."""

    kind = "overloaded"


class DependencyFailed(_Own):
    """A future passed as an argument failed, so the call never ran."""

    kind = "dependency"


class Unavailable(_Own):
    """No executor could take the call (all attempts went unanswered, or its state's holder is down).

    When an attempt went unanswered it may have run: the message says the outcome is unknown and
    names the key (``future_id``) to call again with, ``stub.options(key=...)``, to learn it."""

    kind = "unavailable"


class StateError(_Own):
    """Session state could not be read, committed or moved (the message says why)."""

    kind = "state"


class StateFull(StateError):
    """The node's LMDB map reached its maximum size: nothing was written."""

    kind = "state_full"


class Conflict(StateError):
    """Another call committed the same session objects first (retried by the runtime before you see it)."""

    kind = "conflict"


_KINDS: dict[str, type[RemoteError]] = {
    cls.kind: cls
    for cls in (RemoteError, UnknownActor, UnknownMethod, BadRequest, DeadlineExceeded, Cancelled,
                Overloaded, DependencyFailed, Unavailable, StateError, StateFull, Conflict)
}


def from_wire(d: dict[str, Any]) -> RemoteError:
    """Rebuild a ``RemoteError`` (of the subclass its ``kind`` names) from its wire form; tolerant of
    missing keys, since any process (or a hand-made control reply) may have written it."""
    cls = _KINDS.get(str(d.get("kind", "error")), RemoteError)
    chain = d.get("chain")
    return cls(
        type=str(d.get("type", "Exception")),
        message=str(d.get("message", "")),
        actor=str(d.get("actor", "")),
        method=str(d.get("method", "")),
        traceback=str(d.get("traceback", "")),
        chain=chain if isinstance(chain, list) else [],
        future_id=str(d.get("future_id", "")),
    )


def _safe(fn: Callable[[], Any], fallback: str) -> str:
    try:
        return str(fn())
    except BaseException:  # an exception whose __str__ raises must not take the node down
        return fallback


def to_wire(e: BaseException, actor: str, method: str, future_id: str) -> dict[str, Any]:
    """The wire form of an exception raised by user code, with its traceback (``wire_traceback``).

    Its kind is always ``"error"`` (the method failed, whatever it raised); a ``RemoteError`` it let
    through keeps its remote ``type`` and joins the ``chain``, so the caller sees the nested failure.
    Its texts are scrubbed once, by ``envelope.encode_error``, the one way an error reaches the wire.
    """
    tb = _safe(lambda: wire_traceback(e), f"{type(e).__qualname__} (traceback unavailable)")
    if isinstance(e, RemoteError):
        return {"kind": "error", "type": e.type, "message": e.message, "actor": actor, "method": method,
                "traceback": tb, "chain": [e.to_wire()] + list(e.chain), "future_id": future_id}
    return {"kind": "error", "type": type(e).__qualname__,
            "message": _safe(lambda: e, f"<unprintable {type(e).__qualname__}>"),
            "actor": actor, "method": method, "traceback": tb, "chain": [], "future_id": future_id}


def public_text(e: BaseException) -> str:
    """What a remote caller is told of an exception nalar caught: the text of nalar's own errors
    (written to be sent), only the type of anything else (an OS, LMDB or NATS error names files,
    addresses and hosts). The caller logs the rest, with the future id."""
    if isinstance(e, NalarError):
        return _safe(lambda: e, type(e).__name__)
    return f"{type(e).__name__} (the node's log has the details)"


# -- what of the host stays home ---------------------------------------------------------------------
def wire_traceback(e: BaseException) -> str:
    """``traceback.format_exception(e)`` with every frame's file named by ``wire_filename``.

    Built from the ``TracebackException`` structure (causes, contexts and exception groups included),
    so line numbers, function names and source lines stay as they were. What only a string holds (the
    message, notes, a path literal in a source line) is left to ``scrub``, which ``encode_error`` runs.
    """
    te = _tb.TracebackException(type(e), e, e.__traceback__, compact=True)
    name = _HOST.filename
    _HOST.refresh()
    todo = [te]
    seen: set[int] = set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for frame in t.stack:
            frame.filename = name(frame.filename)
        fn = getattr(t, "filename", None)  # a SyntaxError's own file
        if isinstance(fn, str):
            t.filename = name(fn)
        for nxt in (t.__cause__, t.__context__):
            if nxt is not None:
                todo.append(nxt)
        todo.extend(getattr(t, "exceptions", None) or ())
    return "".join(te.format())


def wire_filename(filename: str) -> str:
    """A frame's file as the wire shows it: relative to the ``sys.path`` entry it lives under (the
    longest that matches; a package imported from elsewhere, an editable install, by its package
    name), else its basename. ``<string>``-style names stay. Cached: errors can be frequent."""
    _HOST.refresh()
    return _HOST.filename(filename)


def scrub(text: str) -> str:
    """``text`` without host details: paths under ``sys.path`` made relative, the home directory as
    ``~``, other absolute paths cut to their last part, credentials in URLs and secret-looking query
    values masked, the host's name (when it is not a common word) replaced. Idempotent, and cheap on
    text that holds none of them."""
    return _HOST.scrub(text) if text else text


_HOME_PARENTS = frozenset({"home", "Users", "u", "users"})
#: Top-level directories taken for host paths even where this host has none (the NATS server's,
#: another node's); this host's own top-level directories count too.
_COMMON_TOPS = frozenset({"home", "Users", "root", "srv", "opt", "var", "tmp", "usr", "etc", "mnt", "media",
                          "data", "app", "apps", "work", "workspace", "workspaces", "code", "src", "build",
                          "models", "run", "nix", "private", "Volumes", "lib", "lib64", "proc", "sys",
                          "dev", "bin", "sbin", "boot", "snap", "scratch", "storage", "volumes", "cache"})
_URL_USER = re.compile(r"(?<=://)[^\s/@'\"<>]+@")
_SECRET_QUERY = re.compile(r"([?&][\w.-]*(?:key|token|secret|passw(?:or)?d|pwd|auth|sig(?:nature)?|credential)s?"
                           r"[\w.-]*=)[^&\s'\"#<>]+", re.IGNORECASE)


def _path_part(m: "re.Match[str]") -> str:
    """An absolute path as ``.../name``: its file stays recognisable, its directories do not travel."""
    parts = [p for p in m.group(0).split("/") if p]
    if len(parts) < 2:
        return m.group(0)  # a bare /tmp or /data names nothing of this host
    if len(parts) == 2 and parts[0] in _HOME_PARENTS:
        return "<path>"  # /home/bob: the last part is the user
    return ".../" + parts[-1]


def _distinctive(name: str) -> bool:
    """A host name worth taking out of texts: one a word boundary cannot confuse with code or prose
    (``ip-10-0-0-5``, ``alice-laptop``, a container id), not ``vm`` or ``worker``."""
    return len(name) >= 3 and name.lower() != "localhost" and not name.isalpha()


class _Host:
    """What this host's texts must lose on the wire, learnt lazily; the roots are looked at again
    whenever ``sys.path`` or the number of loaded modules changes (cheap to check on each error)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self.roots: tuple[tuple[str, str], ...] = ()  # (directory + sep, what replaces it), longest first
        self.text_roots: tuple[tuple[str, str], ...] = ()
        self._names: dict[str, str] = {}
        self._path_re: re.Pattern[str] | None = None
        self._host_re: re.Pattern[str] | None = None
        self._host_words: tuple[str, ...] = ()
        home = os.path.expanduser("~")
        self.home = home.rstrip(os.sep) if home and os.path.isabs(home) and home != os.sep else ""

    # -- learning the host ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Relearn the roots if ``sys.path`` or the loaded modules changed. Instances' threads call it
        too: each field is replaced whole, and the key last, so a reader sees old roots or new ones."""
        key = (tuple(sys.path), len(sys.modules))
        if key == self._key:
            return
        if self._path_re is None:
            self._learn_host()
        roots = self._roots()
        if roots != self.roots:
            extra = [(self.home + os.sep, "~" + os.sep)] if self.home else []
            self.text_roots = tuple(sorted(list(roots) + extra, key=lambda r: -len(r[0])))
            self.roots = roots
            self._names = {}
        self._key = key

    def _roots(self) -> tuple[tuple[str, str], ...]:
        home = self.home
        found: dict[str, str] = {}

        def add(d: str, repl: str) -> None:
            d = os.path.normpath(d)
            if d == os.sep or not os.path.isabs(d) or (home and home.startswith(d + os.sep)):
                return  # "/" or an ancestor of the home directory: what follows would name the user
            found[d] = repl

        for p in sys.path:
            if isinstance(p, str):
                try:
                    add(os.path.abspath(p) if p else os.getcwd(), "")
                except OSError:  # the working directory is gone
                    pass
        on_path = set(found)
        for name, mod in list(sys.modules.items()):  # packages imported from a directory not on sys.path
            if "." in name or mod is None:
                continue
            locs = getattr(mod, "__dict__", {}).get("__path__")
            if locs is None or isinstance(locs, str):
                continue
            try:
                dirs = [d for d in list(locs) if isinstance(d, str)]
            except Exception:
                continue
            for d in dirs:
                if os.path.dirname(os.path.normpath(d)) not in on_path:  # else the sys.path entry says the same
                    add(d, name + os.sep)
        return tuple(sorted(((d + os.sep, r) for d, r in found.items()), key=lambda r: -len(r[0])))

    def _learn_host(self) -> None:
        tops = set(_COMMON_TOPS)
        try:
            tops.update(n for n in os.listdir(os.sep) if re.fullmatch(r"[\w.-]+", n))
        except OSError:
            pass
        alt = "|".join(re.escape(t) for t in sorted(tops, key=len, reverse=True))
        # an absolute path from a top-level directory: never a URL's path ("host/" precedes one), but
        # a file:// URL's; the "/" first lets the regex engine skip to candidates
        self._path_re = re.compile(r"/(?:(?<=file:///)|(?<![\w.~:/\\-]/))(?:" + alt
                                   + r")(?![\w.-])(?:/[^\s/'\"`,;:()\[\]{}<>|]*)*")
        words: set[str] = set()
        try:
            host = socket.gethostname()
        except OSError:
            host = ""
        for h in (host, host.partition(".")[0], re.sub(r"[^A-Za-z0-9_\-]", "-", host)[:40]):
            if _distinctive(h):
                words.add(h)
        if words:
            self._host_words = tuple(sorted(words, key=len, reverse=True))
            self._host_re = re.compile(r"(?<![\w])(?:" + "|".join(map(re.escape, self._host_words)) + r")(?![\w])")

    # -- using it -----------------------------------------------------------------------------------------
    def filename(self, fn: str) -> str:
        """``fn`` on the wire (``refresh`` first)."""
        got = self._names.get(fn)
        if got is None:
            got = self._relative(fn)
            if len(self._names) >= 4096:
                self._names.clear()
            self._names[fn] = got
        return got

    def _relative(self, fn: str) -> str:
        if not fn or fn[0] == "<":
            return fn
        if not os.path.isabs(fn):
            return os.path.basename(fn) if ".." in fn.split(os.sep) else fn
        fn = os.path.normpath(fn)
        for prefix, repl in self.roots:
            if fn.startswith(prefix):
                return repl + fn[len(prefix):]
        return os.path.basename(fn)

    def scrub(self, text: str) -> str:
        self.refresh()
        path_re = self._path_re
        if os.sep in text and path_re is not None:
            for prefix, repl in self.text_roots:
                if prefix in text:
                    text = text.replace(prefix, repl)
            text = path_re.sub(_path_part, text)
        if "@" in text and "://" in text:
            text = _URL_USER.sub("***@", text)
        if "=" in text and "?" in text:
            text = _SECRET_QUERY.sub(r"\1***", text)
        if self._host_re is not None and any(w in text for w in self._host_words):
            text = self._host_re.sub("<host>", text)
        return text


_HOST = _Host()
