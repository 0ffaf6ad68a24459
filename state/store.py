"""The per-node LMDB store: this host's copy of session state, materialised from the log.

Reads come from any thread and never wait on the network; writes go only through the group committer.

The map starts small and doubles when full, up to ``max_map_size`` (``NALAR_STATE_MAX_MAP``, default
64 GiB); past that a write fails with ``StateFull`` and nothing is half-written, because every
batch is one LMDB transaction. Growing the map needs no open transaction in the process, so readers
hold a shared lock that the grower takes exclusively for the instant it resizes.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import lmdb
import orjson

from ..bus.errors import StateError
from . import keys as K

T = TypeVar("T")
DEFAULT_MAP_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_MAP_SIZE = 64 * 1024 ** 3
#: Versions of a unit whose log entry and future id are kept for inspection and for recognising retried
#: futures (``NALAR_STATE_HISTORY``); a snapshot carries them to a node that catches up from it.
DEFAULT_HISTORY = 1000
#: ... and for at least this many seconds after their commit (``NALAR_STATE_DEDUP_WINDOW``), whatever
#: the count: a hot session commits far more than 1,000 versions while a retry outlasts a node's
#: restart (the default retry policy keeps trying for 30 s), and a future forgotten by then would be
#: applied again. A snapshot carries the last ``history`` versions' futures only.
DEFAULT_DEDUP_WINDOW = 120.0


class _RWLock:
    """Many readers or one map-grower; a reader's way in is one uncontended lock, no generator."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._growing = False

    def acquire_shared(self) -> None:
        with self._mutex:
            if self._growing:
                while self._growing:
                    self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._growing:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._growing:
                self._cond.wait()
            self._growing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._growing = False
                self._cond.notify_all()


def _json(data: bytes, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StateError(f"the store holds garbage where {what} should be (not JSON)") from None


def decode_head(data: bytes | None, u: bytes) -> dict[str, Any] | None:
    if data is None:
        return None
    h = _json(data, "a head record")
    if not (isinstance(h, dict) and isinstance(h.get("v"), int) and isinstance(h.get("o"), dict)
            and isinstance(h.get("s"), int)):
        raise StateError(f"corrupt head record for {K.split_unit(u)}")
    return h


def empty_head() -> dict[str, Any]:
    return {"v": 0, "s": 0, "b": 0, "c": 0, "d": 0, "z": 0, "o": {}}


def decode_future(data: bytes) -> tuple[dict[str, Any], bytes]:
    meta, sep, body = data.partition(b"\n")
    m = _json(meta, "a future record")
    if not sep or not isinstance(m, dict) or not isinstance(m.get("v"), int):
        raise StateError("corrupt future record")
    return m, body


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0 <= v < float("inf"):
        raise StateError(f"{var}={raw!r}: expected a number of seconds >= 0")
    return v


def _log_entries(txn: Any, u: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """The unit's version window, oldest first: (version, its log entry)."""
    pre = K.log_prefix(u)
    cur = txn.cursor()
    if cur.set_range(pre):
        for k, v in cur:
            if not k.startswith(pre):
                break
            e = _json(v, "a log record")
            if not isinstance(e, dict):
                raise StateError(f"a log record of {K.split_unit(u)} is not an object")
            yield K.version_of(k), e


class Store:
    """One LMDB environment holding every unit this node holds."""

    def __init__(self, path: str, map_size: int = DEFAULT_MAP_SIZE, max_map_size: int | None = None,
                 sync: bool = True, history: int = DEFAULT_HISTORY,
                 dedup_window: float = DEFAULT_DEDUP_WINDOW) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)  # sessions' state: its owner's only
        self.path = path
        self.max_map_size = max_map_size or int(os.environ.get("NALAR_STATE_MAX_MAP", DEFAULT_MAX_MAP_SIZE))
        self.history = max(1, int(os.environ.get("NALAR_STATE_HISTORY", history)))
        self.dedup_window = _seconds("NALAR_STATE_DEDUP_WINDOW", dedup_window)
        self.sync = sync
        try:
            self.env = lmdb.open(path, map_size=min(map_size, self.max_map_size), subdir=True, max_readers=2048,
                                 sync=sync, metasync=sync, max_dbs=0, lock=True)
        except lmdb.Error as e:
            raise StateError(f"cannot open the state store at {path}: {e}") from None
        self._lock = _RWLock()
        self._check_layout()

    def _check_layout(self) -> None:
        """A store written by an older layout is set aside, never misread: the log is the truth now."""
        with self.env.begin(write=True) as txn:
            got = txn.get(K.LAYOUT_KEY)
            if got == K.LAYOUT:
                return
            if got is None and txn.stat()["entries"] == 0:
                txn.put(K.LAYOUT_KEY, K.LAYOUT)
                return
        raise StateError(f"the state store at {os.path.basename(self.path)!r} has layout {got!r}; this nalar "
                         f"reads {K.LAYOUT!r} (a node sets a layout-1 store aside and moves its units into the "
                         "log when it starts; move this one aside by hand)")

    def close(self) -> None:
        with self._lock.exclusive():
            self.env.close()

    # -- reads (any thread) -------------------------------------------------------------------
    def read(self, fn: Callable[[Any], T]) -> T:
        lock = self._lock
        lock.acquire_shared()
        try:
            with self.env.begin(buffers=False) as txn:
                return fn(txn)
        finally:
            lock.release_shared()

    def get(self, key: bytes) -> bytes | None:
        """One raw value (the hot path: a call's objects, a retried future)."""
        lock = self._lock
        lock.acquire_shared()
        try:
            with self.env.begin(buffers=False) as txn:
                return txn.get(key)  # type: ignore[no-any-return]
        finally:
            lock.release_shared()

    def head(self, u: bytes) -> dict[str, Any] | None:
        return decode_head(self.get(K.head(u)), u)

    def load(self, u: bytes, name: str) -> tuple[bytes | None, int]:
        """The latest value of one object (raw JSON) and the version that wrote it; ``(None, 0)`` if none."""
        def get(txn: Any) -> tuple[bytes | None, int]:
            h = decode_head(txn.get(K.head(u)), u)
            ver = int(h["o"].get(name, 0)) if h else 0
            if not ver:
                return None, 0
            data = txn.get(K.obj(u, name))
            if data is None:
                raise StateError(f"object {name!r} of {K.split_unit(u)} is missing")
            return data, ver
        return self.read(get)

    def objects(self, u: bytes) -> dict[str, bytes]:
        """Every object of a unit, raw (a snapshot record is built from them)."""
        def get(txn: Any) -> dict[str, bytes]:
            h = decode_head(txn.get(K.head(u)), u)
            out: dict[str, bytes] = {}
            for name in (h["o"] if h else ()):
                data = txn.get(K.obj(u, name))
                if data is not None:
                    out[name] = data
            return out
        return self.read(get)

    def find_future(self, fid: str) -> tuple[dict[str, Any], bytes] | None:
        """The committed record of a future (its version and stored reply body), if it committed."""
        data = self.get(K.future(fid))
        return decode_future(data) if data is not None else None

    def recent_futures(self, u: bytes, limit: int) -> list[tuple[str, int, bytes]]:
        """(future id, version, reply) of the unit's last ``limit`` versions known here, oldest first."""
        def scan(txn: Any) -> list[tuple[str, int, bytes]]:
            # newest first from the end of the unit's window: the window may hold far more than
            # ``limit`` versions (the dedup window), and this runs on the loop for every snapshot
            fids: list[str] = []
            pre = K.log_prefix(u)
            cur = txn.cursor()
            # the first key after the unit's window, then one back (or the store's last key)
            ok = cur.prev() if cur.set_range(K.log(u, (1 << 64) - 1)) else cur.last()
            while ok and len(fids) < limit:
                k = cur.key()
                if not k.startswith(pre):
                    break
                e = _json(cur.value(), "a log record")
                if isinstance(e, dict) and isinstance(e.get("f"), str):
                    fids.append(e["f"])
                ok = cur.prev()
            fids.reverse()
            out: list[tuple[str, int, bytes]] = []
            for fid in fids:
                f = txn.get(K.future(fid))
                if f is not None:
                    m, body = decode_future(f)
                    out.append((fid, int(m["v"]), bytes(body)))
            return out
        return self.read(scan)

    def log(self, u: bytes) -> list[dict[str, Any]]:
        def scan(txn: Any) -> list[dict[str, Any]]:
            out = []
            for version, e in _log_entries(txn, u):
                e["version"] = version
                out.append(e)
            return out
        return self.read(scan)

    def units_of(self, session: str) -> list[str]:
        """Actors holding state for this session on this node."""
        def scan(txn: Any) -> list[str]:
            pre = K.session_prefix(session)
            out = []
            cur = txn.cursor()
            if cur.set_range(pre):
                for k in cur.iternext(keys=True, values=False):
                    if not k.startswith(pre):
                        break
                    out.append(k[len(pre):].decode())
            return out
        return self.read(scan)

    def snapshot(self, u: bytes, max_bytes: int = 64 * 1024) -> dict[str, Any]:
        """A unit's latest objects as Python values (for ``nalar state show``).

        An object whose JSON is over ``max_bytes`` is summarised (its size and the start of it).
        """
        def get(txn: Any) -> dict[str, Any]:
            h = decode_head(txn.get(K.head(u)), u)
            if h is None:
                return {"version": 0, "objects": {}}
            objs: dict[str, Any] = {}
            for name in sorted(h["o"]):
                data = txn.get(K.obj(u, name))
                if data is None:
                    objs[name] = None
                elif len(data) > max_bytes:
                    objs[name] = {"$large": len(data), "start": data[:200].decode(errors="replace")}
                else:
                    objs[name] = _json(data, f"object {name!r}")
            return {"version": h["v"], "versions": {n: int(v) for n, v in h["o"].items()}, "objects": objs,
                    "seq": h["s"]}
        return self.read(get)

    # -- the write path (the committer's thread only) -------------------------------------------
    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one durable write transaction, growing the map if it fills."""
        while True:
            try:
                with self._lock.shared(), self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        if size >= self.max_map_size:
            from ..bus.errors import StateFull

            raise StateFull(f"this node's state store is full ({size} bytes, the maximum: raise "
                            "NALAR_STATE_MAX_MAP or free disk)")
        with self._lock.exclusive():
            self.env.set_mapsize(min(size * 2, self.max_map_size))

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])
