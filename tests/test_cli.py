"""The CLI as a new user meets it: `nalar up`, then `nalar call` and `nalar status` with no flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import wait_for

NALAR = [sys.executable, "-m", "nalar.cli.main"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*NALAR, "up", "--data-dir", str(tmp_path / "js")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line:
            break
    assert any("nalar is up" in ln for ln in lines), "".join(lines)
    return proc, lines


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=timeout)


def test_up_call_status_and_ctrl_c_leaves_no_orphans(tmp_path):
    proc, banner = _start_up(tmp_path)
    try:
        server_pids = _children(proc.pid)
        assert server_pids, "nalar up should run nats-server as its child"
        assert any("nalar call Analyst.analyze" in ln for ln in banner)  # it says how to call it

        r = _run("call", "Analyst.analyze", '["the quick brown fox jumps over the lazy dog the end"]')
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out == {"stats": {"words": 11, "chars": 51}, "keywords": ["the", "quick", "brown"]}

        r = _run("call", "Stats.count", '{"text": "a b c"}', "--session", "s1")
        assert r.returncode == 0 and json.loads(r.stdout) == {"words": 3, "chars": 5}

        r = _run("status")
        assert r.returncode == 0, r.stderr
        for actor in ("Analyst", "Stats", "Keywords", "Echo"):
            assert actor in r.stdout
        assert "policy actor  balance, head-of-line, affinity" in r.stdout  # `nalar up` runs it too
        r = _run("status", "--json")
        got = json.loads(r.stdout)
        nodes = got["nodes"]
        assert got["policy"]["rounds"] >= 1 and got["policy"]["policies"] == ["balance", "head-of-line", "affinity"]
        assert len(nodes) == 1 and nodes[0]["actors"]["Analyst"]["done"] >= 1
        assert len(nodes[0]["actors"]["Analyst"]["instances"]) == 2

        r = _run("call", "Echo.nope", "[]")
        assert r.returncode == 1 and "UnknownMethod" in r.stderr and "echo" in r.stderr
        r = _run("call", "NoSuch.thing")
        assert r.returncode == 1 and "no node serves actor 'NoSuch'" in r.stderr
        r = _run("call", "Echo.echo", "{not json")
        assert r.returncode == 2 and "not JSON" in r.stderr
        r = _run("call", "Analyst.analyze", "[1]")
        assert r.returncode == 1 and "AttributeError" in r.stderr  # the remote error, clearly
        r = _run("call", "Echo._private")
        assert r.returncode == 2 and "ACTOR.METHOD" in r.stderr
        r = _run("call", "Echo.echo", "[1]", "--timeout", "inf")
        assert r.returncode == 2 and "finite" in r.stderr
        r = _run("call", "nodot")
        assert r.returncode == 2 and "ACTOR.METHOD" in r.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in server_pids:
        wait_for(lambda: not _alive(pid), what=f"nats-server {pid} to exit")
    r = _run("status")
    assert r.returncode == 3 and "nalar up" in r.stderr  # nothing running: a clear message, no hang


def test_kill_9_of_up_takes_its_server_down(tmp_path):
    proc, _ = _start_up(tmp_path)
    server_pids = _children(proc.pid)
    proc.kill()
    proc.wait()
    for pid in server_pids:
        wait_for(lambda: not _alive(pid), what="the embedded nats-server to die with its owner")


def test_node_rejects_bad_specs(nats_url):
    r = _run("node", "no_such_module:Thing", "--nats", nats_url)
    assert r.returncode == 2 and "cannot import module" in r.stderr
    r = _run("node", "sample_actors:Calc=zero", "--nats", nats_url)
    assert r.returncode == 2 and "must be an integer >= 0" in r.stderr
    r = _run("node", "--nats", nats_url)
    assert r.returncode == 2 and "nothing to serve" in r.stderr


def test_node_enforces_max_instances(nats_url, namespace):
    from conftest import node_env

    r = subprocess.run([*NALAR, "node", "nalar.workloads.demo:Analyst=9", "--nats", nats_url, "--namespace", namespace],
                       capture_output=True, text=True, timeout=60, env=node_env())
    assert r.returncode == 2 and "max_instances" in r.stderr


def test_call_against_explicit_nats_url(start_node, nats_url, namespace):
    start_node("sample_actors:Calc")
    r = subprocess.run([*NALAR, "call", "Calc.add", "[2, 40]", "--nats", nats_url, "--namespace", namespace],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "42"
    env = dict(os.environ, NALAR_NATS_URL=nats_url, NALAR_NAMESPACE=namespace)
    r = subprocess.run([*NALAR, "call", "Calc.add", "[1, 1]"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "2"
