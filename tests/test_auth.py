"""A deployment that lets in only who belongs: `nalar up` with its defaults, probed with each role's credential.

Every refusal here is the NATS server's own (its permissions), seen as the server's "permissions
violation" on the probing connection and as the absence of any effect on the deployment.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest

import nalar
from conftest import node_env
from nalar.bus import auth
from nalar.bus.connection import ConnectOptions, open_connection

NALAR = [sys.executable, "-m", "nalar.cli.main"]


class Up:
    def __init__(self, home: Path, ns: str, url: str, proc: subprocess.Popen[str], out: list[str]) -> None:
        self.home, self.ns, self.url, self.proc, self.out = home, ns, url, proc, out
        self.creds = auth.Credentials(home / "auth" / ns, ns)

    def seed(self, role: str) -> str:
        return str(self.creds.seed_file(role))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `nalar up` with its defaults (credentials on), its own NALAR_HOME."""
    home = tmp_path_factory.mktemp("auth-home")
    ns = "a" + uuid.uuid4().hex[:8]
    env = node_env({"NALAR_HOME": str(home)})
    env.pop("NALAR_NATS_URL", None)
    proc = subprocess.Popen([*NALAR, "up", "--namespace", ns, "--data-dir", str(home / "js")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        out.append(line)
        m = re.search(r"NATS\s+(nats://\S+)", line)
        if m:
            url = m.group(1)
        if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
            break
    assert url and proc.poll() is None, "".join(out)
    import threading

    def pump() -> None:
        for x in proc.stdout or []:
            out.append(x)

    threading.Thread(target=pump, daemon=True).start()
    yield Up(home, ns, url, proc, out)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def at_up(up: Up, monkeypatch: pytest.MonkeyPatch) -> Up:
    """This test runs as a command on the machine of that `nalar up` (it finds it and its credentials)."""
    monkeypatch.setenv("NALAR_HOME", str(up.home))
    return up


async def _raw(up: Up, role: str | None) -> Any:
    """A plain connection (nalar's nats-py client) with ``role``'s seed, or none."""
    opts = ConnectOptions(servers=[up.url], namespace=up.ns, role=role or "client",
                          nkeys_seed=up.seed(role) if role else None, name=f"probe-{role}")
    return await open_connection(opts)


async def _denied(nc: Any, what: str, timeout: float = 10.0) -> str:
    """Wait for the server to say it refused ``what`` on this connection."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in nc.denied:
            if what.lower() in d.lower():
                return d
        await nc.flush()
        await asyncio.sleep(0.02)
    raise AssertionError(f"the server did not refuse {what!r}; it refused: {list(nc.denied)}")


def _status(up: Up) -> dict[str, Any]:
    with nalar.connect(up.url, up.ns, role="operator") as op:
        (node,) = op.status(timeout=2)
        return node


def test_the_banner_names_the_credentials_and_their_files_are_private(up: Up) -> None:
    text = "".join(up.out)
    assert "auth       credentials per role" in text and "--insecure" not in text
    users = up.creds.users()
    assert {n: u["role"] for n, u in users.items()} == {r: r for r in auth.ROLES}
    assert (up.creds.path.stat().st_mode & 0o777) == 0o700
    for role in auth.ROLES:
        assert (os.stat(up.seed(role)).st_mode & 0o777) == 0o600
        assert Path(up.seed(role)).read_text().startswith("SU")
    conf = up.creds.include_file.read_text()
    for role in auth.ROLES:  # the server's config holds public keys only
        assert Path(up.seed(role)).read_text().strip() not in conf
        assert users[role]["public_key"] in conf


async def test_a_connection_without_credentials_is_refused_with_a_way_out(up: Up) -> None:
    with pytest.raises(nalar.BusError) as e:
        await _raw(up, None)
    assert "requires credentials" in str(e.value) and "NALAR_NATS_NKEY" in str(e.value)
    import nats

    with pytest.raises(Exception):  # plain nats-py too: the server, not nalar, refuses
        await nats.connect(up.url, max_reconnect_attempts=0, connect_timeout=3, allow_reconnect=False)


def test_the_local_commands_find_their_role_and_work(at_up: Up) -> None:
    env = node_env({"NALAR_HOME": str(at_up.home)})
    env.pop("NALAR_NATS_URL", None)
    r = subprocess.run([*NALAR, "call", "Notebook.add", '["buy milk"]', "--session", "me"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*NALAR, "state", "show", "me"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "buy milk" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*NALAR, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "policy actor  balance" in r.stdout, r.stdout + r.stderr


async def test_client_credentials_call_but_cannot_listen_forge_or_read(at_up: Up) -> None:
    up = at_up
    node = await asyncio.to_thread(_status, up)
    before_v = node["control"]["applied_version"]
    before_inst = {a: len(v["instances"]) for a, v in node["actors"].items()}
    spy = await _raw(up, "client")
    heard: list[str] = []

    async def on(msg: Any) -> None:
        heard.append(msg.subject)

    try:
        p = f"nalar.{up.ns}."
        # 1. listening to every call, or to every reply
        await spy.subscribe(p + "call.>", cb=on)
        await _denied(spy, f'subscription to "{p}call.>"')
        await spy.subscribe(p + "r.>", cb=on)
        await _denied(spy, f'subscription to "{p}r.>"')
        # 2. a decision (the forged batch), and writing the snapshot, the leader lease, a bucket
        forged = {"v": 2 ** 53, "full": True, "ops": [["scale", node["node"], "Notebook", 0, []],
                                                     ["scale", node["node"], "Echo", 40, []]]}
        await spy.publish(p + "policy", orjson.dumps(forged))
        await _denied(spy, f'publish to "{p}policy"')
        await spy.publish(f"$KV.nalar_{up.ns}_policy.table", orjson.dumps(forged))
        await _denied(spy, f'publish to "$kv.nalar_{up.ns}_policy.table"')
        await spy.publish(f"$KV.nalar_{up.ns}_placement.me", b"evil")
        await _denied(spy, f'publish to "$kv.nalar_{up.ns}_placement.me"')
        await spy.publish(f"$KV.nalar_{up.ns}_leader.leader", b'{"leader":"evil","term":1}')
        await _denied(spy, f'publish to "$kv.nalar_{up.ns}_leader.leader"')
        # 3. another session's state: from a node, from the log, or by appending to it
        with pytest.raises(asyncio.TimeoutError):
            await spy.request(p + f"node.{node['node']}", orjson.dumps({"op": "show", "session": "me"}), timeout=1)
        await _denied(spy, f'publish to "{p}node.{node["node"].lower()}"')
        with pytest.raises(asyncio.TimeoutError):
            await spy.request(f"$JS.API.STREAM.MSG.GET.nalar_{up.ns}_state", b'{"seq":1}', timeout=1)
        await _denied(spy, f'publish to "$js.api.stream.msg.get.nalar_{up.ns}_state"')
        await spy.publish(p + "state.bWU.Tm90ZWJvb2s", b"garbage")
        await _denied(spy, f'publish to "{p}state.')
        # the forged export (stream a session's state "to evil") and export_done (drop it)
        await spy.publish(p + f"node.{node['node']}", orjson.dumps({"op": "export", "session": "me", "to": "evil"}))
        await spy.publish(p + f"node.{node['node']}", orjson.dumps({"op": "export_done", "session": "me", "ok": True}))
        await spy.publish(p + "status", b"{}")
        await _denied(spy, f'publish to "{p}status"')
        await spy.publish(f"$JS.API.STREAM.DELETE.nalar_{up.ns}_state", b"")
        await _denied(spy, "publish to \"$js.api.stream.delete")
        # 4. while it tries, calls work, and the spy heard none of them
        with nalar.connect(up.url, up.ns) as c:
            assert c.stub("Analyst").analyze("the quick brown fox the").result(30)["stats"]["words"] == 5
            n = c.stub("Notebook", session="me2").add("and bread").result(30)
            assert c.stub("Notebook", session="me2").notes().result(30)[n - 1] == "and bread"
        await spy.flush()
        assert heard == []
    finally:
        await spy.close()
    after = await asyncio.to_thread(_status, up)
    assert after["control"]["applied_version"] == before_v  # no decision applied
    assert {a: len(v["instances"]) for a, v in after["actors"].items()} == before_inst
    assert after["state"]["units"] >= 1
    with nalar.connect(up.url, up.ns, role="operator") as op:  # the session the forgeries aimed at is intact
        assert op.state_show("me")["units"]["Notebook"]["objects"]["notes"][0] == "buy milk"


async def test_forged_replies_never_reach_a_caller(at_up: Up) -> None:
    """The issue's measurement: a client on `call.>` answered 110 of 200 calls. Now: none."""
    up = at_up
    forger = await _raw(up, "client")
    forged = 0

    async def answer(msg: Any) -> None:
        nonlocal forged
        if msg.reply:
            await forger.publish(msg.reply, orjson.dumps({"ok": True, "result": "forged"}))
            forged += 1

    try:
        await forger.subscribe(f"nalar.{up.ns}.call.>", cb=answer)
        await _denied(forger, "subscription to")
        c = await nalar.connect_async(up.url, up.ns)
        try:
            texts = [" ".join(["fox"] * (i % 9 + 1)) for i in range(200)]
            futs = [c.stub("Analyst").analyze(t) for t in texts]
            results = [await f for f in futs]
        finally:
            await c.aclose()
        # guessing a reply subject does not work either: a client may publish only calls and cancels
        await forger.publish(f"nalar.{up.ns}.r.{c.runtime.principal}.{c.runtime.proc}.1", b'{"ok":true}')
        await _denied(forger, f'publish to "nalar.{up.ns}.r.')
    finally:
        await forger.close()
    assert forged == 0
    assert [r["stats"]["words"] for r in results] == [i % 9 + 1 for i in range(200)]  # each its own answer


async def test_two_clients_have_separate_inboxes(at_up: Up) -> None:
    """A second client credential (`nalar auth add`) cannot subscribe to the first one's replies."""
    up = at_up
    env = node_env({"NALAR_HOME": str(up.home)})
    r = subprocess.run([*NALAR, "auth", "add", "app2", "--role", "client", "--namespace", up.ns], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "reloaded" in r.stdout, r.stdout + r.stderr
    first = auth.principal_from_seed_file(up.seed("client"))
    opts = ConnectOptions(servers=[up.url], namespace=up.ns, nkeys_seed=str(up.creds.seed_file("app2")))
    assert opts.principal() != first
    nc = await open_connection(opts)  # admitted after the reload, without restarting `nalar up`
    try:
        async def ignore(msg: Any) -> None:
            pass

        await nc.subscribe(f"nalar.{up.ns}.r.{first}.>", cb=ignore)
        await _denied(nc, f'subscription to "nalar.{up.ns}.r.{first}.>"')
    finally:
        await nc.close()


async def test_stolen_node_credentials_still_cannot_decide(at_up: Up) -> None:
    up = at_up
    nc = await _raw(up, "node")
    try:
        await nc.publish(f"nalar.{up.ns}.policy", b'{"v":99999999,"full":true,"ops":[]}')
        await _denied(nc, f'publish to "nalar.{up.ns}.policy"')
        await nc.publish(f"$KV.nalar_{up.ns}_policy.table", b"{}")
        await _denied(nc, f'publish to "$kv.nalar_{up.ns}_policy.table"')
    finally:
        await nc.close()


async def test_stolen_policy_credentials_still_cannot_break_the_hints(at_up: Up) -> None:
    """The server lets a policy credential publish decisions; the nodes still refuse what breaks the hints."""
    up = at_up
    node = await asyncio.to_thread(_status, up)
    with nalar.connect(up.url, up.ns, role="operator") as op:
        pst = op.policy_status()
    assert pst is not None
    term = pst["term"]
    assert isinstance(term, int) and term > 0  # the `nalar up`'s policy actor leads, elected
    v = node["control"]["applied_version"]
    before = dict(node["control"].get("refused") or {})
    nc = await _raw(up, "policy")
    try:
        p = f"nalar.{up.ns}.policy"
        await nc.publish(p, orjson.dumps({"v": v + 1, "prev": v, "term": term,
                                          "ops": [["scale", node["node"], "Notebook", 0, []]]}))
        await nc.publish(p, orjson.dumps({"v": v + 1, "prev": v, "term": term,
                                          "ops": [["scale", node["node"], "Echo", 10 ** 6, []]]}))
        await nc.publish(p, orjson.dumps({"v": 2 ** 53, "full": True, "term": term,
                                          "ops": [["scale", node["node"], "Echo", 40, []]]}))
        await nc.flush()
        assert not nc.denied  # the server let them through: the nodes' own checks are what refuse them
    finally:
        await nc.close()

    def refused() -> dict[str, Any] | None:
        st = _status(up)
        r = st["control"].get("refused") or {}
        grown = all(r.get(k, 0) > before.get(k, 0) for k in ("below_min", "absurd_count", "version_jump"))
        return st if grown else None

    from conftest import wait_for

    after = await asyncio.to_thread(wait_for, refused, 30, "the node to refuse all three")
    assert {a: len(x["instances"]) for a, x in after["actors"].items()} == \
        {a: len(x["instances"]) for a, x in node["actors"].items()}
    assert after["control"]["applied_version"] < 2 ** 53


async def test_nobody_gets_a_server_or_a_node_to_write_for_them(at_up: Up) -> None:
    """Answers bounced onto a KV key or the state log: the JetStream API (which answers on any reply
    subject from inside the server) is not a client's at all, and nodes and the policy actor answer
    only on inboxes, whatever reply subject a message names."""
    import base64

    up = at_up
    with nalar.connect(up.url, up.ns, role="operator") as op:
        op.stub("Notebook", session="bounce").add("keep me").result(30)
        before = op.policy_status()
        notes = op.state_show("bounce")["units"]["Notebook"]["objects"]["notes"]
    node = await asyncio.to_thread(_status, up)
    b64 = [base64.urlsafe_b64encode(x).rstrip(b"=").decode() for x in (b"bounce", b"Notebook")]
    lease, unit = f"$KV.nalar_{up.ns}_leader.leader", f"nalar.{up.ns}.state.{b64[0]}.{b64[1]}"
    client, operator = await _raw(up, "client"), await _raw(up, "operator")
    try:
        await client.publish(f"$JS.API.STREAM.INFO.KV_nalar_{up.ns}_policy", b"", reply=lease)
        await _denied(client, f'publish to "$js.api.stream.info.kv_nalar_{up.ns}_policy"')
        await client.publish(f"$JS.API.DIRECT.GET.KV_nalar_{up.ns}_leader", b"{}", reply=unit)
        await _denied(client, "publish to \"$js.api.direct.get")
        for _ in range(20):  # a node's answer (and its ack) aimed at the state log; the policy's at the lease
            await client.publish(f"nalar.{up.ns}.call.Echo", orjson.dumps({"m": "echo", "a": ["pwned"], "k": {}}),
                                 reply=unit, headers={"Nalar-Id": uuid.uuid4().hex, "Nalar-Deadline": str(time.time() + 30)})
            await operator.publish(f"nalar.{up.ns}.policy.status", b"{}", reply=lease)
        await client.flush()
        await operator.flush()
    finally:
        await client.close()
        await operator.close()

    def dropped() -> dict[str, Any] | None:
        st = _status(up)
        return st if st["malformed"].get("reply", 0) >= node["malformed"].get("reply", 0) + 20 else None

    from conftest import wait_for

    await asyncio.to_thread(wait_for, dropped, 30, "the node to drop the 20 calls answered elsewhere")
    with nalar.connect(up.url, up.ns, role="operator") as op:
        after = op.policy_status()
        assert op.state_show("bounce")["units"]["Notebook"]["objects"]["notes"] == notes == ["keep me"]
        op.stub("Notebook", session="bounce").add("and me").result(30)  # the unit's log is whole: it commits
        assert op.state_show("bounce")["units"]["Notebook"]["objects"]["notes"] == ["keep me", "and me"]
    assert after is not None and before is not None
    assert after["leader"] == before["leader"] and after["term"] == before["term"]  # never deposed


def test_future_ids_cannot_be_guessed_from_one_another(at_up: Up) -> None:
    with nalar.connect(at_up.url, at_up.ns) as c:
        a, b = c.stub("Echo").echo(1), c.stub("Echo").echo(2)
        a.result(30), b.result(30)
    pa, ta = a.id.split("-")
    pb, tb = b.id.split("-")
    assert pa == pb and len(pa) == 16  # the process: 64 random bits
    assert ta[:-16] != tb[:-16] and ta[-16:] != tb[-16:] and all(len(t) >= 17 for t in (ta, tb))


def test_insecure_is_explicit_and_loud(tmp_path: Path) -> None:
    env = node_env({"NALAR_HOME": str(tmp_path / "home")})
    env.pop("NALAR_NATS_URL", None)
    proc = subprocess.Popen([*NALAR, "up", "--insecure", "--namespace", "open", "--data-dir", str(tmp_path / "js")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(out)
        assert "WARNING: --insecure" in text and "accepts anyone" in text, text
        assert not (tmp_path / "home" / "auth").exists()  # no credentials made, none needed
        r = subprocess.run([*NALAR, "call", "Echo.echo", '["hi"]'], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "hi" in r.stdout, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_auth_config_is_what_an_operator_runs_on_their_own_server(tmp_path: Path) -> None:
    """`nalar auth init/config` for a server nalar does not start: users in an account of their own."""
    d = tmp_path / "creds"
    env = node_env({"NALAR_HOME": str(tmp_path / "home")})
    r = subprocess.run([*NALAR, "auth", "init", "--dir", str(d), "--namespace", "prod"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*NALAR, "auth", "config", "--dir", str(d), "--namespace", "prod", "--account", "NALAR"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "accounts {" in r.stdout, r.stderr
    from nalar.bus.server import EmbeddedNats

    server = EmbeddedNats(data_dir=str(tmp_path / "js"), extra_config=r.stdout)
    url = server.start()
    try:
        creds = auth.Credentials(d, "prod")

        async def probe() -> list[str]:
            nc = await open_connection(ConnectOptions(servers=[url], namespace="prod", nkeys_seed=str(creds.seed_file("client"))))
            await nc.publish("nalar.prod.policy", b"{}")
            got = await _denied(nc, 'publish to "nalar.prod.policy"')
            await nc.close()
            return [got]

        assert asyncio.run(probe())
    finally:
        server.stop()


def _junk(rng: Any, n: int, max_payload: int) -> list[tuple[bytes, dict[str, str] | None]]:
    """Malformed and forged bodies: random bytes, broken and wrong-typed JSON, forged headers, a huge one."""
    base: list[bytes] = [b"", b"\x00\xff\xfe", b"{", b"[]", b"null", b'"x"', b"1e999", b'{"v": "x"}',
                         b'{"m": 1, "a": {}, "k": []}', b'{"m": "__init__", "a": [], "k": {}}',
                         b'{"m": "add", "a": [{"$bytes": "!!"}], "k": {}}', b'{"ids": 7}', b'{"ids": ["x"]}',
                         b'{"op": "pull", "session": {}}', b'{"op": "show", "session": "me"}',
                         b'{"v": 9007199254740992, "full": true, "ops": [["scale", "x", "Echo", 1000000, []]]}',
                         b'{"v": 1, "prev": 0, "term": -1, "ops": [["nope"]]}', b'{"node": 5, "actors": []}',
                         orjson.dumps({"deep": [[[[[[[[[[]]]]]]]]]] * 50}), b"\xc3\x28" * 100,
                         b"a" * (max_payload - 4096)]
    out: list[tuple[bytes, dict[str, str] | None]] = []
    for i in range(n):
        body = base[i % len(base)] if i < len(base) else bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
        headers = None
        if i % 3 == 1:
            headers = {"Nalar-Id": "x" * rng.randrange(1, 300), "Nalar-Deadline": rng.choice(["nan", "-1", "1e308", "x"]),
                       "Nalar-Attempt": rng.choice(["-5", "x", "99999999999"]), "Nalar-Session": "s" * rng.randrange(400)}
        out.append((body, headers))
    return out


async def test_fuzz_every_subject_with_and_without_credentials_under_load(at_up: Up) -> None:
    """Malformed and forged messages on every subject the deployment listens on, as every role, while a
    client's load runs: the node never goes down, and every acknowledged call is there exactly once."""
    import random

    up = at_up
    node = await asyncio.to_thread(_status, up)
    name = node["node"]
    p = f"nalar.{up.ns}."
    principals = [auth.principal_from_seed_file(up.seed(r)) for r in auth.ROLES]
    subjects = ([p + f"call.{a}" for a in node["actors"]] + [p + f"call.{a}.{name}" for a in node["actors"]]
                + [p + s for s in ("cancel", "status", f"node.{name}", f"hb.{name}", "hb.ghost", "policy", "metrics",
                                   "policy.status", "state.bWU.Tm90ZWJvb2s", "call.Ghost")]
                + [p + f"r.{pr}.{'0' * 16}.{t}" for pr in principals for t in ("1", "ack", "q1")]
                + [f"$KV.nalar_{up.ns}_policy.table", f"$KV.nalar_{up.ns}_leader.leader",
                   f"$JS.API.STREAM.MSG.GET.nalar_{up.ns}_state", f"$JS.API.STREAM.INFO.KV_nalar_{up.ns}_policy"])
    # without credentials nothing gets as far as a subject: the server refuses the connection
    for _ in range(3):
        with pytest.raises(nalar.BusError, match="requires credentials"):
            await _raw(up, None)
    r, w = await asyncio.open_connection(*up.url.removeprefix("nats://").rsplit(":", 1))
    w.write(b"PUB " + (p + "policy").encode() + b" 2\r\n{}\r\n" + b"SUB > 1\r\n")  # no CONNECT: the server drops it
    await w.drain()
    assert b"Authorization Violation" in await asyncio.wait_for(r.read(4096), 10) + await asyncio.wait_for(r.read(4096), 10)
    w.close()

    stop = asyncio.Event()
    load: dict[str, Any] = {"ok": 0, "failed": [], "added": []}

    async def client_load() -> None:
        async with await nalar.connect_async(up.url, up.ns) as c:
            k = 0
            # through all the fuzzing and at least 100 calls, at most 400
            while k < 400 and not (stop.is_set() and load["ok"] >= 100):
                k += 1
                try:
                    got = await c.stub("Analyst", timeout=60).analyze(" ".join(["fox"] * (k % 7 + 1)))
                    assert got["stats"]["words"] == k % 7 + 1
                    await c.stub("Notebook", session="fuzz", timeout=60).add(f"n{k}")
                    load["added"].append(f"n{k}")
                    load["ok"] += 1
                except Exception as e:  # counted, and the test fails on any
                    load["failed"].append(repr(e))

    worker = asyncio.get_running_loop().create_task(client_load())
    rng = random.Random(13)
    sent = 0
    t0 = time.monotonic()
    for role in auth.ROLES:
        nc = await _raw(up, role)
        junk = _junk(rng, 40, nc.max_payload)
        try:
            for subject in subjects:
                for body, headers in junk:
                    await nc.publish(subject, body, reply=rng.choice(["", p + "r.ghost.1", nc.new_inbox()]),
                                     headers=headers)
                    sent += 1
                await nc.flush()
        finally:
            await nc.close()
        assert time.monotonic() - t0 < 240, "the fuzzing is bounded in time too"
    stop.set()
    await asyncio.wait_for(worker, 180)
    assert up.proc.poll() is None, "".join(up.out[-40:])  # the node (and the policy actor) never went down
    after = await asyncio.to_thread(_status, up)
    assert after["pid"] == node["pid"]
    assert load["failed"] == [] and load["ok"] >= 1, load["failed"][:5]
    async with await nalar.connect_async(up.url, up.ns) as c:
        notes = await c.stub("Notebook", session="fuzz").notes()
    assert sorted(notes) == sorted(load["added"])  # every acknowledged write there exactly once
    print(f"fuzz: {sent} messages on {len(subjects)} subjects as {len(auth.ROLES)} roles; "
          f"{load['ok']} calls under load, 0 failed; node malformed counters {after.get('malformed')}")


def test_a_client_asking_for_status_hears_why_not(at_up: Up) -> None:
    with nalar.connect(at_up.url, at_up.ns) as c:  # role client
        with pytest.raises(nalar.BusError, match="may not ask nodes for their status.*operator"):
            c.status(timeout=0.5)


def test_a_benchmark_pointed_at_an_authenticated_server_says_why_not(at_up: Up) -> None:
    env = node_env({"NALAR_HOME": str(at_up.home)})
    t = time.monotonic()
    r = subprocess.run([*NALAR, "bench", "calls", "--nats", at_up.url], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3 and "requires credentials" in r.stderr and "--insecure" in r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t < 20 and "Traceback" not in r.stderr
