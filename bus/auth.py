"""Who may do what on the bus: nalar's roles as NATS permissions, and the nkeys that carry them.

NATS enforces all of it. nalar only writes the server's ``authorization`` block (or an account's users)
from a directory of credentials, and has each process connect with its role's nkey:

=========  ==========================================================================================
role       may
=========  ==========================================================================================
client     publish calls and cancels; receive replies on its own inbox only; ask a node for the decisions
operator   what a client may, and ask nodes and the policy actor for status and session state
node       serve calls, answer anyone's call, exchange session state, append to the state log, publish
           heartbeats and metrics; read (never write) the decisions in force
policy     gather metrics, publish decisions, write the decisions snapshot and hold the leader lease
=========  ==========================================================================================

A credential is an nkeys user seed in a file of its own (owner-only), the form ``nats --nkey`` takes;
the server's config holds only public keys. Each credential's replies arrive under
``nalar.<ns>.r.<principal>.``, where the principal is derived from its public key, and only that
credential may subscribe there: a client cannot read another's replies, nor answer its calls.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import orjson

from .errors import BusError
from .subjects import check_token

ROLES = ("client", "operator", "node", "policy")
#: What ``nalar auth init`` (and ``nalar up``) create: one credential per role, named after it.
DEFAULT_USERS = ROLES
MANIFEST = "users.json"
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def principal_of(public_key: str) -> str:
    """The reply-subject token of an nkey user: short, fixed by the key, a valid subject token."""
    return "k" + public_key[1:17].lower()


def principal_from_seed_file(path: str) -> str:
    """The principal of the nkey user whose seed is in ``path`` (``BusError`` if it is not one)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise BusError(f"cannot read the nkey seed file {path}: {e.strerror or e}") from None
    return principal_from_seed(raw, path)


def principal_from_seed(seed: str | bytes, where: str = "NALAR_NATS_NKEY_SEED") -> str:
    """The principal of the nkey user with this seed (``BusError`` if it is not one)."""
    import nkeys

    try:
        kp = nkeys.from_seed(bytearray(seed.strip().encode() if isinstance(seed, str) else seed.strip()))
        pub = kp.public_key.decode()
        kp.wipe()
    except Exception:
        raise BusError(f"{where} is not an nkeys user seed (one line starting with 'SU')") from None
    return principal_of(pub)


def principal_from_creds(path: str) -> str:
    """The principal of a NATS ``.creds`` file (a JWT and the user's seed): the seed decides it."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BusError(f"cannot read the credentials file {path}: {e.strerror or e}") from None
    m = re.search(r"-----BEGIN USER NKEY SEED-----\s*(SU[A-Z2-7]+)", text)
    if not m:
        raise BusError(f"{path} holds no user nkey seed; is it a NATS .creds file?")
    return principal_from_seed(m.group(1), path)


# -- permissions --------------------------------------------------------------------------------
def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _read_stream(stream: str) -> list[str]:
    """The JetStream API subjects that read a stream (what opening and getting from a KV bucket use)."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>"]


def _own_stream(stream: str) -> list[str]:
    """...and those that create and reconfigure it."""
    return _read_stream(stream) + [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]


def permissions(role: str, namespace: str, principal: str) -> dict[str, Any]:
    """The NATS ``permissions`` of ``role`` in ``namespace`` for the user whose principal is given."""
    if role not in ROLES:
        raise BusError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    ns = check_token(namespace, "namespace")
    check_token(principal, "principal")
    p = f"nalar.{ns}."
    policy_kv, leader_kv = f"nalar_{ns}_policy", f"nalar_{ns}_leader"
    decisions = _read_stream(_kv_stream(policy_kv)) + _read_stream(_kv_stream(leader_kv))
    inbox = f"{p}r.{principal}.>"
    listen = [inbox, f"{p}hb.*", f"{p}policy"]  # replies, liveness, decisions: every process
    # Clients and operators get no JetStream API at all: the server answers an API request on whatever
    # reply subject it names, from inside, so a read right would let them write any subject by bouncing
    # the answer (a KV key, the state log). They take the decisions in force from a node instead.
    calls = [f"{p}call.>", f"{p}cancel", f"{p}policy.snapshot"]
    if role == "client":
        pub, sub = calls, listen
    elif role == "operator":
        pub = calls + [f"{p}status", f"{p}node.*", f"{p}policy.status", f"{p}metrics"]
        sub = listen
    elif role == "node":
        state = f"nalar_{ns}_state"
        pub = calls + decisions + _own_stream(state) + [f"{p}r.>", f"{p}hb.*", f"{p}node.*", f"{p}state.>"]
        sub = listen + [f"{p}call.>", f"{p}cancel", f"{p}status", f"{p}metrics", f"{p}node.*",
                        f"{p}policy.snapshot"]
    else:  # policy
        pub = (_own_stream(_kv_stream(policy_kv)) + _own_stream(_kv_stream(leader_kv))
               + [f"$KV.{policy_kv}.>", f"$KV.{leader_kv}.>", f"{p}policy", f"{p}metrics"])
        sub = listen + [f"{p}policy.status"]
        # it answers status requests: the server lets it reply to what it was asked, and nothing else under r.
        return {"publish": {"allow": pub}, "subscribe": {"allow": sub}, "allow_responses": True}
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}}


# -- the credentials directory ------------------------------------------------------------------
def default_dir(namespace: str) -> Path:
    """Where ``nalar up`` keeps a namespace's credentials: ``$NALAR_HOME/auth/<namespace>``."""
    from .discovery import home

    return home() / "auth" / check_token(namespace, "namespace")


class Credentials:
    """A directory of nkey seeds (``<name>.nk``, owner-only) and ``users.json`` (name -> role, public key).

    ``users.json`` holds no secret: it is all a server needs (``server_users``), so it can be handed to
    the NATS server's host while each seed goes only where its role runs.
    """

    def __init__(self, path: str | os.PathLike[str], namespace: str) -> None:
        self.path = Path(path)
        self.namespace = check_token(namespace, "namespace")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Credentials":
        """The credentials in ``path``, whichever namespace its ``users.json`` is for."""
        try:
            raw = orjson.loads((Path(path) / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise BusError(f"no {MANIFEST} in {path}: create the credentials with `nalar auth init --dir {path}`") from None
        except (OSError, orjson.JSONDecodeError) as e:
            raise BusError(f"{Path(path) / MANIFEST} is unreadable ({e})") from None
        ns = raw.get("namespace") if isinstance(raw, dict) else None
        if not isinstance(ns, str):
            raise BusError(f"{Path(path) / MANIFEST} names no namespace; regenerate it with `nalar auth init`")
        return cls(path, ns)

    @property
    def include_file(self) -> Path:
        """The server config block for these credentials (no secrets), kept current by every change:
        a server started with ``include`` of it picks changes up on a reload (SIGHUP)."""
        return self.path / "server.conf"

    # reading
    def users(self) -> dict[str, dict[str, str]]:
        try:
            raw = orjson.loads((self.path / MANIFEST).read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as e:
            raise BusError(f"{self.path / MANIFEST} is unreadable ({e}); regenerate it with `nalar auth init`") from None
        users = raw.get("users") if isinstance(raw, dict) else None
        if not isinstance(users, dict):
            raise BusError(f"{self.path / MANIFEST} has no 'users' map; regenerate it with `nalar auth init`")
        if raw.get("namespace") not in (None, self.namespace):
            raise BusError(f"{self.path} holds credentials for namespace {raw.get('namespace')!r}, "
                           f"not {self.namespace!r}")
        return users

    def seed_file(self, name: str) -> Path:
        return self.path / f"{name}.nk"

    def for_role(self, role: str) -> Path | None:
        """The seed file a process of ``role`` connects with: the one named after the role, if here."""
        f = self.seed_file(role)
        return f if f.is_file() and role in self.users() else None

    # writing
    def init(self) -> list[str]:
        """Create the credential of every role that has none; returns the names created."""
        with self._locked():
            have = self.users()
            return [self._add(name, name) for name in DEFAULT_USERS if name not in have]

    def add(self, name: str, role: str) -> str:
        """A new credential ``name`` with ``role`` (``BusError`` if the name is taken)."""
        with self._locked():
            return self._add(name, role)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two ``nalar auth add`` at once must not lose one another's user)."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, stat.S_IRWXU)
        fd = os.open(self.path / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _add(self, name: str, role: str) -> str:
        import nkeys

        if not _NAME.fullmatch(name):
            raise BusError(f"credential name {name!r}: use 1 to 64 letters, digits, '_' and '-'")
        if role not in ROLES:
            raise BusError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        users = self.users()
        if name in users:
            raise BusError(f"a credential named {name!r} exists already in {self.path}")
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        kp = nkeys.from_seed(bytearray(seed))
        public = kp.public_key.decode()
        kp.wipe()
        _write_private(self.seed_file(name), seed + b"\n")
        users[name] = {"role": role, "public_key": public}
        self._save(users)
        return name

    def remove(self, name: str) -> None:
        with self._locked():
            users = self.users()
            if name not in users:
                raise BusError(f"no credential named {name!r} in {self.path}")
            del users[name]
            self._save(users)
        try:
            self.seed_file(name).unlink()
        except FileNotFoundError:
            pass

    def _save(self, users: dict[str, dict[str, str]]) -> None:
        body = orjson.dumps({"namespace": self.namespace, "users": users}, option=orjson.OPT_INDENT_2)
        _write_private(self.path / MANIFEST, body + b"\n")
        if users:
            _write_private(self.include_file, self.server_config().encode())

    # the server's side
    def manifest(self) -> "Manifest":
        return Manifest(self.namespace, self.users(), str(self.path / MANIFEST))

    def server_config(self, account: str | None = None) -> str:
        return server_config([self.manifest()], account)

    def env_file(self) -> str:
        """The credentials as a ``.env`` file for docker-compose: each role's seed, and the public
        manifest the server needs (``NALAR_AUTH_USERS``)."""
        lines = [f"# nalar credentials for namespace {self.namespace!r} (from {self.path}): keep this file private",
                 f"NALAR_NAMESPACE={self.namespace}"]
        for name, u in sorted(self.users().items()):
            if name in ROLES:
                lines.append(f"NALAR_{name.upper()}_SEED={self.seed_file(name).read_text().strip()}")
        lines.append("NALAR_AUTH_USERS=" + orjson.dumps({"namespace": self.namespace, "users": self.users()}).decode())
        return "\n".join(lines) + "\n"


class Manifest:
    """Who may connect, for one namespace: names, roles and public keys (no secret)."""

    def __init__(self, namespace: str, users: dict[str, dict[str, str]], where: str = "") -> None:
        self.namespace = check_token(namespace, "namespace")
        self.users = users
        self.where = where

    @classmethod
    def parse(cls, text: str | bytes, where: str) -> "Manifest":
        """A ``users.json`` (or ``NALAR_AUTH_USERS``) body; ``BusError`` saying what is wrong if it is not one."""
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise BusError(f"{where} is not JSON ({e}); produce it with `nalar auth init` or `nalar auth env`") from None
        if not (isinstance(raw, dict) and isinstance(raw.get("namespace"), str) and isinstance(raw.get("users"), dict)):
            raise BusError(f"{where} must be {{'namespace': ..., 'users': {{...}}}} as `nalar auth` writes it")
        return cls(raw["namespace"], raw["users"], where)

    def server_users(self) -> list[dict[str, Any]]:
        """Every credential as a NATS config user: its public key and its role's permissions."""
        out = []
        for name, u in sorted(self.users.items()):
            pub = u.get("public_key", "") if isinstance(u, dict) else ""
            role = u.get("role", "") if isinstance(u, dict) else ""
            if not (isinstance(pub, str) and pub.startswith("U") and len(pub) == 56):
                raise BusError(f"{self.where}: user {name!r} has no nkey public key")
            out.append({"nkey": pub, "permissions": permissions(role, self.namespace, principal_of(pub))})
        return out


def server_config(sets: list[Manifest], account: str | None = None) -> str:
    """The nats-server config block that admits exactly these credentials (one manifest per namespace).

    Without ``account`` it is an ``authorization`` block (the server's global account); with one, an
    ``accounts`` block whose account has JetStream and these users, for a server that has accounts of
    its own (merge it into yours).
    """
    users: list[dict[str, Any]] = []
    for m in sets:
        got = m.server_users()
        if not got:
            raise BusError(f"no credentials in {m.where}: create them with `nalar auth init`")
        users += got
    body = orjson.dumps(users, option=orjson.OPT_INDENT_2).decode()
    head = "".join(f"# nalar namespace {m.namespace!r}: generated from {m.where}\n" for m in sets)
    if account is None:
        return head + f"authorization {{\n  users = {body}\n}}\n"
    check_token(account, "account")
    return head + f"accounts {{\n  {account} {{\n    jetstream: enabled\n    users = {body}\n  }}\n}}\n"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only, atomically (no moment where it is not)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600, a name of its own
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
