"""`nalar up` as a dev server: it keeps its sessions across restarts, stops cleanly when a terminal's
Ctrl-C hits the whole process group (under load), and says so when its NATS server dies."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nalar
from conftest import node_env, wait_for

NALAR = [sys.executable, "-m", "nalar.cli.main"]


class Proc:
    """A nalar command in a session of its own, as a terminal runs it (its own process group)."""

    def __init__(self, home: Path, *args: str, marker: str = "Ctrl-C stops everything") -> None:
        env = node_env({"NALAR_HOME": str(home)})
        env.pop("NALAR_NATS_URL", None)
        self.p = subprocess.Popen([*NALAR, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env, start_new_session=True)
        self.lines: list[str] = []
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)
            if marker in line:
                return
        raise AssertionError("it exited before it was ready:\n" + "".join(self.lines))

    def ctrl_c(self) -> None:
        os.killpg(self.p.pid, signal.SIGINT)  # the whole group, as a terminal does

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        assert self.p.stdout is not None
        rest = self.p.stdout.read()
        return self.p.wait(timeout), "".join(self.lines) + rest

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def _server_pid(home: Path) -> int:
    return int(json.loads((home / "up.json").read_text())["server_pid"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ctrl_c_under_load_drains_then_stops_in_order_and_a_restart_finds_everything(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("NALAR_HOME", str(home))
    up = Proc(home, "up")
    extra: Proc | None = None
    try:
        banner = "".join(up.lines)
        assert f"data       {home / 'up' / 'default'}" in banner and "join       NALAR_NATS_URL=" in banner
        server = _server_pid(home)
        # started separately (serving an actor the load does not use: the load's calls are all up's node's)
        extra = Proc(home, "node", "sample_actors:Gate", "--name", "extra", marker=" ready on ")

        async def load() -> tuple[float, dict[str, int]]:
            c = await nalar.connect_async()
            try:
                assert await c.stub("Notebook", session="me").add("buy milk") == 1
                parked = [c.stub("Echo", timeout=120).wait(i) for i in range(100)]  # never finish by themselves
                busy = [c.stub("Analyst", timeout=120).analyze("the fox " * 40) for _ in range(100)]
                await asyncio.sleep(0)  # sent
                await c.stub("Echo").echo("in flight now")
                t = time.monotonic()
                up.ctrl_c()
                results = await asyncio.gather(*parked, *busy, return_exceptions=True)
                took = time.monotonic() - t
            finally:
                await c.aclose()
            kinds: dict[str, int] = {}
            for r in results:
                kinds[type(r).__name__] = kinds.get(type(r).__name__, 0) + 1
            return took, kinds

        took, kinds = asyncio.run(load())
        code, out = up.finish()
        print(f"Ctrl-C under load: every call ended {took:.2f} s after it, {kinds}")
        assert code == 0, out
        assert took < 10 and sum(kinds.values()) == 200  # promptly, none left to its deadline
        assert set(kinds) <= {"dict", "int", "Cancelled", "Unavailable"}, kinds
        assert "Traceback" not in out and "UnexpectedEOF" not in out and "nalar stopped" in out, out
        assert _gone(server) and not (home / "up.json").exists()  # nothing left behind

        t = time.monotonic()
        up = Proc(home, "up")
        print(f"nalar up again: ready in {time.monotonic() - t:.2f} s")
        with nalar.connect(role="operator") as op:
            assert op.state_show("me")["units"]["Notebook"]["objects"]["notes"] == ["buy milk"]
            assert op.stub("Notebook", session="me").add("and bread").result(30) == 2
            t = time.monotonic()
            wait_for(lambda: "extra" in {n["node"] for n in op.status(timeout=1)}, 30, "the separate node back")
            print(f"the separately started node was back {time.monotonic() - t:.2f} s after the banner")
        up.ctrl_c()
        assert up.finish()[0] == 0
        assert extra.p.poll() is None  # it waits for the server to come back: nothing to restart by hand
    finally:
        up.kill()
        if extra is not None:
            extra.kill()


def test_fresh_starts_over_and_a_taken_port_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("NALAR_HOME", str(home))
    up = Proc(home, "up")
    try:
        with nalar.connect() as c:
            c.stub("Notebook", session="s").add("x").result(30)
        port = json.loads((home / "up" / "default" / "up-node.json").read_text())["port"]
        up.ctrl_c()
        assert up.finish()[0] == 0
        import socket

        with socket.socket() as squat:  # someone else took the remembered port meanwhile
            squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (past the last run's TIME_WAIT)
            squat.bind(("127.0.0.1", port))
            squat.listen()
            r = subprocess.run([*NALAR, "up"], env=node_env({"NALAR_HOME": str(home)}), capture_output=True,
                               text=True, timeout=60)
            assert r.returncode != 0 and f"127.0.0.1:{port} is taken" in r.stderr and "Traceback" not in r.stderr, \
                r.stdout + r.stderr
        up = Proc(home, "up", "--fresh")
        assert "--fresh: dropped" in "".join(up.lines)
        with nalar.connect(role="operator") as op:
            assert op.state_show("s")["units"] == {}
    finally:
        up.kill()


def test_a_dead_server_is_said_and_ends_nalar_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = Proc(home, "up")
    try:
        server = _server_pid(home)
        t = time.monotonic()
        os.kill(server, signal.SIGKILL)
        code, out = up.finish()
        took = time.monotonic() - t
        print(f"nalar up noticed its dead server and exited in {took:.2f} s")
        assert code == 1 and "the NATS server (nats-server" in out and "exited with code -9" in out, out
        assert "Traceback" not in out and took < 10, out
        assert not (home / "up.json").exists()
    finally:
        up.kill()


def test_the_gateway_comes_up_with_it_and_goes_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nalar up --gateway-port``: HTTP reaches the demo actors through a gateway that connected with
    the client credential by itself; SIGKILL of ``nalar up`` alone takes the gateway down with it; a
    busy port is said and the rest still runs."""
    import socket

    import httpx

    from conftest import free_port

    home = tmp_path / "home"
    monkeypatch.setenv("NALAR_HOME", str(home))
    port = free_port()
    up = Proc(home, "up", "--gateway-port", str(port))
    try:
        banner = "".join(up.lines)
        assert f"gateway    http://127.0.0.1:{port}" in banner, banner
        r = httpx.post(f"http://127.0.0.1:{port}/v1/actors/Notebook/add", json=["buy milk"],
                       headers={"X-Session-Id": "gw"}, timeout=30)
        assert r.status_code == 200 and r.json() == {"result": 1}, r.text
        assert httpx.post(f"http://127.0.0.1:{port}/v1/actors/Nobody/x", json=[], timeout=30).status_code == 404
        gateway = [c for c in _children(up.p.pid) if "nalar.cli.main gateway" in c[1]]
        assert len(gateway) == 1, gateway
        up.p.kill()  # SIGKILL, to nalar up alone
        up.p.wait(30)
        wait_for(lambda: _gone(gateway[0][0]) or _zombie(gateway[0][0]), 30, "the gateway to die with nalar up")
        with socket.socket() as s:  # and its port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        up.kill()
    with socket.socket() as squat:
        squat.bind(("127.0.0.1", port))
        squat.listen()
        up = Proc(home, "up", "--gateway-port", str(port))
        try:
            banner = "".join(up.lines)
            assert f"the gateway did not start on 127.0.0.1:{port}" in banner and "gateway    http" not in banner
            with nalar.connect() as c:  # the rest runs
                assert c.stub("Notebook", session="gw").add("and bread").result(30) == 2
        finally:
            up.kill()


def _zombie(pid: int) -> bool:
    """Dead, and not yet reaped by whoever it was handed to."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of ``pid``'s child processes, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return out
