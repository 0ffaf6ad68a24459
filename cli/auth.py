"""``nalar auth``: create, list and remove a deployment's credentials; print its server config.

The credentials live in a directory (default ``$NALAR_HOME/auth/<namespace>``, where ``nalar up``
keeps its own): one nkey seed per credential, owner-only, and ``users.json`` with public keys only.
After a change the local ``nalar up`` using that directory reloads its server at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..bus import auth, discovery


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("auth", help="credentials and per-role permissions (nkeys; NATS enforces them)")
    asub = p.add_subparsers(dest="auth_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--namespace", default=os.environ.get("NALAR_NAMESPACE", "default"))
        sp.add_argument("--dir", default=None, help="credentials directory (default: $NALAR_HOME/auth/NAMESPACE)")

    common(asub.add_parser("init", help="create the client, operator, node and policy credentials (if missing)"))
    add = asub.add_parser("add", help="one more credential, e.g. one per client application")
    add.add_argument("name", help="the credential's name: letters, digits, '_' and '-' (its seed is NAME.nk)")
    add.add_argument("--role", required=True, choices=auth.ROLES,
                     help="what it may do: client (calls), operator (status, state), node, policy (README: Security)")
    common(add)
    rm = asub.add_parser("remove", help="remove a credential (the server refuses it from its next reload)")
    rm.add_argument("name", help="the credential to remove")
    common(rm)
    common(asub.add_parser("show", help="list the credentials: name, role, public key, seed file"))
    common(asub.add_parser("env", help="print the credentials as a .env file for docker-compose (creating them "
                                       "if missing); keep it private: umask 077; nalar auth env > .env"))
    cfg = asub.add_parser("config", help="print the nats-server config block that admits exactly these credentials")
    cfg.add_argument("--account", default=None,
                     help="put the users in this account (an `accounts` block, for a server with accounts of its own)")
    common(cfg)


def run(a: argparse.Namespace) -> int:
    creds = auth.Credentials(a.dir or auth.default_dir(a.namespace), a.namespace)
    if a.auth_cmd == "init":
        made = creds.init()
        print(f"credentials for namespace {a.namespace!r} in {creds.path}: "
              + (f"created {', '.join(made)}" if made else "all four exist already"))
        _reload(creds)
        _show(creds)
        return 0
    if a.auth_cmd == "add":
        creds.add(a.name, a.role)
        print(f"created {a.name} ({a.role}): {creds.seed_file(a.name)}")
        _reload(creds)
        return 0
    if a.auth_cmd == "remove":
        creds.remove(a.name)
        print(f"removed {a.name}")
        _reload(creds)
        return 0
    if a.auth_cmd == "env":
        creds.init()
        sys.stdout.write(creds.env_file())
        return 0
    if a.auth_cmd == "show":
        if not creds.users():
            print(f"no credentials in {creds.path}: `nalar auth init` creates them", file=sys.stderr)
            return 1
        _show(creds)
        return 0
    sys.stdout.write(creds.server_config(a.account))
    return 0


def _show(creds: auth.Credentials) -> None:
    print(f"  {'NAME':<16} {'ROLE':<9} {'PUBLIC KEY':<57} SEED FILE")
    for name, u in sorted(creds.users().items()):
        seed = creds.seed_file(name)
        print(f"  {name:<16} {u['role']:<9} {u['public_key']:<57} {seed if seed.exists() else '(not on this machine)'}")


def _reload(creds: auth.Credentials) -> None:
    """If the local ``nalar up`` serves these credentials, have its server re-read them now."""
    running = discovery.find_running()
    if not running or not running.get("auth") or not running.get("server_pid"):
        return
    if Path(running["auth"]).resolve() != creds.path.resolve():
        return
    try:
        os.kill(int(running["server_pid"]), signal.SIGHUP)
        print(f"the running nalar up's NATS server (pid {running['server_pid']}) reloaded them")
    except (ProcessLookupError, PermissionError) as e:
        print(f"could not reload the running nalar up's NATS server ({e}); restart it", file=sys.stderr)
