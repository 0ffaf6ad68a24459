"""The CLI as a new user meets it: `nalar up`, then `nalar call` and `nalar status` with no flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


# -- the CLI's conventions (issue 14, point 3) ----------------------------------------------------------

def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """Expected errors are one ``nalar: ...`` line, never a traceback."""
    assert r.stderr.startswith("nalar: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def _timed(*args: str, env: dict[str, str] | None = None, **kw: object) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60, env=env, **kw)  # type: ignore[call-overload]
    return r, time.monotonic() - t


def test_version_bare_nalar_and_missing_subcommands_print_help():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"nalar {version('nalar')}"
    r = _run()
    assert r.returncode == 0 and r.stdout.startswith("usage: nalar") and "required" not in r.stderr
    for cmd in ("up", "call", "status", "completion", "bench"):
        assert f"    {cmd} " in r.stdout  # every command, with its one-line help
    for code in ("0 ", "1 ", "2 ", "3 ", "130", "141"):
        assert f"\n  {code}" in r.stdout  # the exit statuses
    r = _run("state")
    assert r.returncode == 0 and "show" in r.stdout and "migrate" in r.stdout
    r = _run("auth")
    assert r.returncode == 0 and "init" in r.stdout


# options owned by other files, reported to their owners: they get their help there, not here
_HELP_PENDING: set[str] = set()


def test_every_command_and_option_has_help():
    import argparse

    from nalar.cli.args import subcommands, walk
    from nalar.cli.main import BENCHMARKS, build_parser
    from nalar.policy.builtin import BUILTIN

    root = build_parser()
    missing = []
    for p in walk(root):
        sub = subcommands(p)
        if sub is not None:
            missing += [f"{p.prog} {c.dest}" for c in sub._choices_actions if not c.help]
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{p.prog} {a.option_strings[-1] if a.option_strings else a.dest}")
    assert sorted(set(missing) - _HELP_PENDING) == []

    for cmd in ("up", "policy"):  # the policy lists name every built-in policy, with what it does
        text = _run(cmd, "--help").stdout
        for name in BUILTIN:
            option = text.split("\n  --policies LIST")[1].split("\n  --interval")[0]
            assert name in "".join(option.split()) and f"\n  {name} " in text, (cmd, name)
    text = _run("bench", "--help").stdout
    for name, what in BENCHMARKS.items():
        assert f"\n  {name} " in text and what.split()[0] in text
    text = _run("call", "--help").stdout
    for word in ("--priority", "@FILE", "$NALAR_DEFAULT_TIMEOUT"):
        assert word in text


def test_completion_scripts_come_from_the_parser():
    r = _run("completion", "bash")
    assert r.returncode == 0 and "_shtab_nalar" in r.stdout
    script = r.stdout + ("\nCOMP_WORDS=(nalar st); COMP_CWORD=1; _shtab_nalar; echo \"${COMPREPLY[@]}\""
                         "\nCOMP_WORDS=(nalar call --pr); COMP_CWORD=2; _shtab_nalar; echo \"${COMPREPLY[@]}\""
                         "\nCOMP_WORDS=(nalar bench s); COMP_CWORD=2; _shtab_nalar; echo \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["status state", "--priority", "state swe"]
    for shell in ("zsh", "fish", "tcsh"):
        r = _run("completion", shell)
        assert r.returncode == 0 and "nalar" in r.stdout and "call" in r.stdout
    r = _run("completion", "cmd.exe")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_up_options_reach_run_up(monkeypatch, capsys):
    """The ``up`` dispatch: every new option is parsed, checked and passed by name (``cli/up.py`` runs it)."""
    import nalar.cli.up as up
    from nalar.cli.main import main

    got: dict[str, object] = {}

    def fake_run_up(specs, namespace, data_dir, policies, interval, **kw):  # type: ignore[no-untyped-def]
        got.update(namespace=namespace, data_dir=data_dir, interval=interval, policies=[p.name for p in policies], **kw)
        return 0

    monkeypatch.setattr(up, "run_up", fake_run_up)
    assert main(["up", "--host", "0.0.0.0", "--port", "4333", "--name", "n1", "--max-payload", "16MiB", "--fresh",
                 "--data-dir", "/tmp/d", "--policies", "proportional,sticky", "--insecure", "--gateway-port", "9001",
                 "--gateway-host", "0.0.0.0", "--metrics-port", "9500"]) == 0
    assert got == {"namespace": "default", "data_dir": "/tmp/d", "interval": 1.0, "policies": ["proportional", "sticky"],
                   "insecure": True, "host": "0.0.0.0", "port": 4333, "name": "n1", "max_payload": 16 << 20,
                   "fresh": True, "gateway_port": 9001, "gateway_host": "0.0.0.0", "resources": None,
                   "metrics_port": 9500}
    got.clear()
    monkeypatch.delenv("NALAR_GATEWAY_PORT", raising=False)
    assert main(["--namespace", "ns1", "up"]) == 0  # a global flag before the command
    assert got["namespace"] == "ns1" and got["host"] == "127.0.0.1" and got["port"] is None
    assert got["max_payload"] == 8 << 20 and got["fresh"] is False and got["name"] is None
    assert got["gateway_port"] == 8000 and got["gateway_host"] == "127.0.0.1"
    assert main(["up", "--gateway-port", "0"]) == 0 and got["gateway_port"] == 0  # none
    monkeypatch.delenv("NALAR_METRICS_PORT", raising=False)
    assert main(["up"]) == 0 and got["metrics_port"] == 9464  # on by default (loopback)
    assert main(["up", "--metrics-port", "0"]) == 0 and got["metrics_port"] == 0  # off
    for bad in (["--port", "0"], ["--port", "http"], ["--max-payload", "128MiB"], ["--max-payload", "lots"],
                ["--gateway-port", "70000"]):
        try:
            main(["up", *bad])
            raise AssertionError(f"{bad} was accepted")
        except SystemExit as e:
            assert e.code == 2
    assert "--max-payload" in capsys.readouterr().err


def test_global_flags_before_or_after_the_command(start_node, nats_url, namespace):
    start_node("sample_actors:Calc")
    r = _run("--nats", nats_url, "--namespace", namespace, "call", "Calc.add", "[2, 40]")
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    r = _run("call", "Calc.add", "--nats", nats_url, "[1, 2]", "--namespace", namespace)  # between positionals too
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    r = _run("--namespace", namespace, "status", "--nats", nats_url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["nodes"][0]["actors"]["Calc"]
    r = _run("state", "--nats", nats_url, "show", "nobody", "--namespace", namespace)  # on a group, too
    assert r.returncode == 1 and "no node holds state for session 'nobody'" in r.stdout, r.stderr
    r = _run("--timeout", "5", "node", "--demo")
    assert r.returncode == 2 and "--timeout does not apply to `nalar node`" in r.stderr


def test_one_default_timeout_for_cli_and_api(start_node, nats_url, namespace):
    start_node("sample_actors:Calc")
    base = ["call", "Calc.deadline", "--nats", nats_url, "--namespace", namespace]
    for extra, env, want in (([], {}, 300.0), ([], {"NALAR_DEFAULT_TIMEOUT": "123"}, 123.0),
                             (["--timeout", "7"], {"NALAR_DEFAULT_TIMEOUT": "123"}, 7.0)):
        before = time.time()
        r = subprocess.run([*NALAR, *base, *extra], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, **env))
        assert r.returncode == 0, r.stderr
        left = float(r.stdout) - before
        assert want - 10 < left <= want + 1, (extra, env, left)
    r = _run("--timeout", "7", *base)  # the global flag is the same flag
    assert r.returncode == 0 and float(r.stdout) - time.time() < 8


def test_call_priority_reaches_the_actor(start_node, nats_url, namespace, tmp_path):
    from conftest import TESTS

    (tmp_path / "cli_probe.py").write_text(
        "import nalar\nfrom nalar.actors.context import current_scope\n\n\n"
        "class Probe(nalar.Tool):\n"
        "    def priority(self) -> int:\n"
        "        scope = current_scope.get()\n"
        "        return scope.priority if scope is not None else -1\n")
    start_node("cli_probe:Probe", env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])})
    base = ["call", "Probe.priority", "--nats", nats_url, "--namespace", namespace]
    assert _run(*base, "--priority", "7").stdout.strip() == "7"
    assert _run(*base).stdout.strip() == "0"
    r = _run(*base, "--priority", "high")
    assert r.returncode == 2 and "--priority" in r.stderr


def test_call_arguments_from_a_file_or_stdin(start_node, nats_url, namespace, tmp_path):
    """Under the server's max_payload (8 MiB here) a file's argument is sent; a 20 MB one is refused clearly."""
    start_node("sample_actors:Rough")
    base = ["call", "Rough.echo", "--nats", nats_url, "--namespace", namespace]
    small = tmp_path / "3mb.json"
    small.write_bytes(b'["' + b"y" * 3_000_000 + b'"]')  # far past the command line's 128 KiB per argument
    r = _run(*base, f"@{small}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == '"' + "y" * 3_000_000 + '"\n'
    r = subprocess.run([*NALAR, *base, "-"], input='{"x": {"from": "stdin"}}', capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout) == {"from": "stdin"}, r.stderr

    big = tmp_path / "20mb.json"
    big.write_bytes(b'["' + b"z" * 20_000_000 + b'"]')
    r = _run(*base, f"@{big}")
    err = _one_line_error(r)
    assert r.returncode == 2 and "Argument list too long" not in err
    assert "20,000," in err and "8,388,608 bytes (8.0 MiB)" in err and nats_url in err
    assert "`nalar up --max-payload BYTES`" in err and "`nalar nats --max-payload BYTES`" in err
    assert r.stdout == ""

    r = _run(*base, f"@{tmp_path / 'missing.json'}")
    assert r.returncode == 2 and "cannot read the arguments from" in _one_line_error(r) and "missing.json" in r.stderr
    r = subprocess.run([*NALAR, *base, "-"], input="not json", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "the arguments in stdin are not JSON" in _one_line_error(r)
    r = _run(*base, "@")
    assert r.returncode == 2 and "'@' needs a file name" in _one_line_error(r)


def test_call_sends_20mb_from_a_file_when_max_payload_allows(tmp_path, namespace):
    from conftest import NodeProc, node_env
    from nalar.bus.server import EmbeddedNats

    server = EmbeddedNats(data_dir=str(tmp_path / "js"), max_payload=32 << 20)
    url = server.start()
    node = NodeProc(["sample_actors:Rough", "--nats", url, "--namespace", namespace, "--grace", "1",
                     "--state-dir", str(tmp_path / "state")], node_env())
    try:
        node.wait_ready()
        big = tmp_path / "20mb.json"
        big.write_bytes(b'{"x": "' + b"z" * 20_000_000 + b'"}')
        r = _run("call", "Rough.echo", f"@{big}", "--nats", url, "--namespace", namespace)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(r.stdout) == 20_000_003 and r.stdout.startswith('"zzz')
    finally:
        node.stop()
        server.stop()


def test_connection_failures_name_the_url_and_cause_within_the_timeout():
    import socket

    r, took = _timed("status", "--nats", "nats://127.0.0.1:1")  # a closed loopback port
    err = _one_line_error(r)
    assert r.returncode == 3 and "nats://127.0.0.1:1" in err and "connection refused" in err, err
    assert took < 2 + 5, took  # --timeout 2 (status's default), plus starting Python on a busy machine

    for bad in ("nats://127.0.0.1:notaport", "http://127.0.0.1:4222", "nats://", "127.0.0.1:4222 x"):
        r = _run("call", "Echo.echo", "[1]", "--nats", bad)
        err = _one_line_error(r)
        assert r.returncode == 3 and f"bad NATS URL {bad!r}" in err, err

    with socket.socket() as silent:  # accepts TCP (the kernel's backlog), never says a word of NATS
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        r, took = _timed("call", "Echo.echo", "[1]", "--nats", url, "--timeout", "1.5")
        err = _one_line_error(r)
        assert r.returncode == 3 and url in err and "no NATS server answered within 1.5 s" in err, err
        assert 1.5 <= took < 1.5 + 5, took  # it was 10.7 s whatever --timeout said
        r, took = _timed("--timeout", "1", "state", "show", "s1", "--nats", url)
        assert r.returncode == 3 and "within 1 s" in _one_line_error(r) and took < 1 + 5


def test_closed_stdout_is_quiet(start_node, nats_url, namespace):
    """`nalar status | head -1`: the reader left; no traceback, the status a SIGPIPE'd writer reports."""
    start_node("sample_actors:Calc")
    for args in (["status"], ["status", "--json"], ["call", "Calc.add", "[1, 2]"]):
        read, write = os.pipe()
        os.close(read)  # every write now fails with EPIPE, as after `head -1` exits
        try:
            r = subprocess.run([*NALAR, *args, "--nats", nats_url, "--namespace", namespace], stdout=write,
                               stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        assert r.returncode == 141 and r.stderr == "", (args, r.stderr)
    r = subprocess.run(["sh", "-c", f"{' '.join(NALAR)} status --nats {nats_url} --namespace {namespace} | head -1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("policy actor") and r.stderr == ""


def test_ctrl_c_of_a_waiting_call_exits_130_quietly(start_node, nats_url, namespace, client):
    start_node("nalar.workloads.demo:Echo")
    proc = subprocess.Popen([*NALAR, "call", "Echo.wait", "--nats", nats_url, "--namespace", namespace],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(n["actors"]["Echo"]["running"] for n in client.status()), what="the call to run")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and out == "" and err == "", err
    finally:
        if proc.poll() is None:
            proc.kill()
        client.stub("Echo").release().result()


def test_connection_causes_read_as_words():
    """The mapping of what nats-py raises on a first connect, for causes a test cannot make on loopback."""
    import asyncio
    import socket
    import ssl

    import nats.errors

    from nalar.bus.connection import _causes

    refused = [ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 4222)"),
               ConnectionRefusedError(111, "Connect call failed ('10.0.0.2', 4222)")]
    assert _causes(nats.errors.NoServersError(), refused, 3, True) == (
        "connection refused at 10.0.0.1:4222, 10.0.0.2:4222 (nothing listens there: is the server running, on that "
        "port?)")
    assert _causes(asyncio.TimeoutError(), refused[:1], 0.5, False).endswith("(gave up after 0.5 s)")
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert _causes(nats.errors.NoServersError(), [dns], 3, False) == \
        "cannot resolve the host name (Name or service not known)"
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.reason, cert.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"
    assert _causes(cert, [cert], 3, False) == "TLS failed: CERTIFICATE_VERIFY_FAILED (self-signed certificate)"
    assert _causes(nats.errors.UnexpectedEOF(), [], 3, False).startswith("the server closed the connection")
