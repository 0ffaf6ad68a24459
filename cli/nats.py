"""``nalar nats``: a standalone NATS server (JetStream on) admitting nalar's credentials, in the foreground.

What docker-compose runs, and what a host without its own NATS can run: the same server ``nalar up``
embeds, on the address given, with the users of one or more credentials directories (``users.json``
only: the server needs no secret), TLS if given, and the HTTP monitor only if asked for.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..bus import auth
from ..bus.errors import BusError
from ..bus.server import EmbeddedNats


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("nats", help="run a standalone NATS server (JetStream) admitting nalar's credentials")
    p.add_argument("--listen", default="127.0.0.1:4222", metavar="HOST:PORT",
                   help="where clients connect (default: 127.0.0.1:4222; 0.0.0.0:4222 in a container)")
    p.add_argument("--data-dir", required=True, help="JetStream's data directory (keep it on a volume)")
    p.add_argument("--auth-dir", action="append", default=[], metavar="DIR",
                   help="a credentials directory (its users.json) to admit; repeat for more namespaces")
    p.add_argument("--users-env", default="NALAR_AUTH_USERS", metavar="VAR",
                   help="also admit the users in this environment variable, as `nalar auth env` writes it "
                        "(default: NALAR_AUTH_USERS, if set)")
    p.add_argument("--insecure", action="store_true", help="admit anyone, without credentials (tests only)")
    p.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM) ...")
    p.add_argument("--tls-key", default=None, help="... and this key")
    p.add_argument("--tls-ca", default=None, help="also require client certificates signed by this CA")
    p.add_argument("--monitor", default=None, metavar="HOST:PORT", help="serve the HTTP monitor here (default: off)")
    p.add_argument("--max-payload", type=int, default=None, metavar="BYTES",
                   help="the largest message the server takes, headers included (default: 8 MiB, as nalar up)")


def config_lines(a: argparse.Namespace) -> str:
    lines = []
    sets = [auth.Credentials.load(d).manifest() for d in a.auth_dir]
    if os.environ.get(a.users_env):
        sets.append(auth.Manifest.parse(os.environ[a.users_env], f"${a.users_env}"))
    if sets and a.insecure:
        raise BusError("--insecure and credentials together: choose one")
    if sets:
        lines.append(auth.server_config(sets))
    elif not a.insecure:
        raise BusError(f"no credentials to admit: give --auth-dir DIR (from `nalar auth init --dir DIR`) or set "
                       f"{a.users_env} (from `nalar auth env`), or run --insecure")
    a.admitting = ", ".join(m.where for m in sets)
    if bool(a.tls_cert) != bool(a.tls_key):
        raise BusError("--tls-cert and --tls-key go together")
    if a.tls_cert:
        tls = [f'cert_file: "{a.tls_cert}"', f'key_file: "{a.tls_key}"']
        if a.tls_ca:
            tls += [f'ca_file: "{a.tls_ca}"', "verify: true"]
        lines.append("tls { " + " ".join(tls) + " }")
    if a.monitor:
        lines.append(f'http: "{a.monitor}"')
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    host, _, port = a.listen.rpartition(":")
    if not host or not port.isdigit():
        raise BusError(f"--listen {a.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:4222")
    extra = config_lines(a)
    kw = {"max_payload": a.max_payload} if a.max_payload else {}
    server = EmbeddedNats(data_dir=a.data_dir, host=host.strip("[]"), port=int(port), extra_config=extra, **kw)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = server.start()
    who = "anyone (--insecure)" if a.insecure else "the credentials in " + a.admitting
    print(f"nalar nats ready on {url}{' (TLS)' if a.tls_cert else ''}, admitting {who}", flush=True)
    if a.insecure:
        print("WARNING: --insecure: anyone who can reach this server can read and change every session's state",
              file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                print("nalar nats: the server exited", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0
