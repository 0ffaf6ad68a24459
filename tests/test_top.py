"""`nalar top` against a real `nalar up` under load, read off a real terminal: tmux at 80x24.

The deployment serves ``Prio`` (one call at a time) behind a gate, so a client's calls queue up; its
policy actor runs ``sticky`` and a declared session route, so decisions are in force. The screen is
read with ``tmux capture-pane`` until what is expected shows (bounded), never after a fixed sleep.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import free_port, node_env

NALAR = [sys.executable, "-m", "nalar.cli.main"]
TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
GATE = "top-" + uuid.uuid4().hex[:8]
CALLS = 12  # queued behind the one that holds the gate
#: A client that queues CALLS calls (one session each) behind a held one, and opens the gate on a line of stdin.
LOAD = f"""
import asyncio, sys, nalar
async def main():
    c = await nalar.connect_async()
    futs = [c.stub("Prio").block({GATE!r})]
    futs += [c.stub("Prio", session=f"s{{i}}").step("k", str(i)) for i in range({CALLS})]
    print("sent", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await c.stub("GateCtl").release({GATE!r})
    print(len(await asyncio.gather(*futs)), flush=True)
    await c.aclose()
asyncio.run(main())
"""


class Up:
    """A `nalar up` in its own NALAR_HOME and process group, on a free port; ready once its banner ends."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.env = node_env({"NALAR_HOME": str(home),
                             "NALAR_TEST_DECLARED": json.dumps({"routes": [["s1", "Prio", "Prio-n1-0"]]})})
        self.env.pop("NALAR_NATS_URL", None)
        self.proc = subprocess.Popen([*NALAR, "up", *args, "--name", "n1", "--port", str(free_port()),
                                      "--data-dir", str(home / "up")], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)
        self.out: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout or []:
                self.out.append(line)
                if "Ctrl-C stops everything" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        assert ready.wait(60) and self.proc.poll() is None, "".join(self.out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Pane:
    """A command in a detached tmux session of a given size, on a tmux server of this test's own."""

    def __init__(self, env: dict[str, str], command: str, width: int = 80, height: int = 24) -> None:
        assert TMUX is not None
        self.tmux = [TMUX, "-L", "nalar-top-" + uuid.uuid4().hex[:8]]
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("NALAR_HOME", "PYTHONPATH", "PATH"))
        # `trap :` keeps the shell through a Ctrl-C (its child, top, gets the default disposition back)
        script = f"export {exports} TERM=xterm-256color; trap : INT; {command}; echo TOP-EXIT=$?; stty -a; echo STTY-DONE; sleep 60"
        subprocess.run([*self.tmux, "-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", str(height),
                        "sh", "-c", script], check=True, timeout=20)

    def text(self, joined: bool = False) -> str:
        """The screen; ``joined``: lines the terminal wrapped come back as one (so a too-long line shows)."""
        r = subprocess.run([*self.tmux, "capture-pane", "-p", *(["-J"] if joined else [])], capture_output=True,
                           text=True, timeout=10)
        return r.stdout

    def wait(self, ok: Callable[[str], bool], what: str, timeout: float = 20) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.text()
            if ok(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.text()}")

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", *keys], check=True, timeout=10)

    def kill(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=10)


def _queued(screen: str) -> int:
    """Prio's queue on node n1, as the actors table shows it (0 if no row yet)."""
    m = re.search(r"^Prio\s+(?:n1\s+)?(\d+)\s", screen, re.M)  # at 60 columns, without NODE
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """A deployment with CALLS+1 calls on Prio: one running (held at the gate), the rest queued."""
    up = Up(tmp_path_factory.mktemp("top-home"), "sample_actors:Prio", "sample_actors:GateCtl",
            "--policies", "sample_policies:Declared,sticky")
    load = subprocess.Popen([sys.executable, "-c", LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=up.env)
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "sent"
        yield up
        assert load.stdin is not None
        load.stdin.write("go\n")
        load.stdin.flush()
        assert load.stdout.readline().strip() == str(CALLS + 1)  # every call answered once the gate opened
        load.wait(20)
    finally:
        if load.poll() is None:
            load.kill()
        up.stop()


@pytest.fixture
def pane() -> Iterator[Callable[..., Pane]]:
    """Make panes; each one's tmux server is killed after the test."""
    made: list[Pane] = []

    def make(env: dict[str, str], command: str, width: int = 80, height: int = 24) -> Pane:
        p = Pane(env, command, width, height)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill()


def _top(*args: str) -> str:
    return shlex.join([*NALAR, "top", *args])


@needs_tmux
def test_top_shows_queues_decisions_node_and_leader_then_q_restores_the_terminal(loaded: Up, pane) -> None:
    p = pane(loaded.env, _top())
    screen = p.wait(lambda s: _queued(s) > 0 and "routes Prio: 1 session" in s and "sticky Prio" in s
                    and re.search(r"^n1\s+up\s", s, re.M) is not None
                    and re.search(r"^leader\s+\S+ term \d+", s, re.M) is not None,
                    "the queue, the decisions, the node and the leader")
    assert _queued(screen) <= CALLS and re.search(r"^\s+Prio-n1-0\s+\d+\s+1/1\s", screen, re.M), screen
    assert "q quits" in screen.splitlines()[0]
    p.keys("q")
    after = p.wait(lambda s: "STTY-DONE" in s, "top to quit on q")
    assert "TOP-EXIT=0" in after and "nalar top" not in after, after  # the alternate screen is gone
    assert re.search(r"(?<![-\w])icanon\b", after) and re.search(r"(?<![-\w])echo\b", after), after  # cooked mode again


@needs_tmux
@pytest.mark.parametrize("width", [80, 60])
def test_top_fits_the_terminal_without_wrapping(loaded: Up, pane, width: int) -> None:
    p = pane(loaded.env, _top(), width=width, height=24)
    p.wait(lambda s: _queued(s) > 0, "the actors table")
    rows = p.text(joined=True).rstrip("\n").split("\n")
    assert len(rows) <= 24 and rows[0].startswith(" nalar top"), rows
    too_long = [r for r in rows if len(r.rstrip()) > width]
    assert not too_long, too_long
    if width < 80:  # columns that matter least went first; the queue stayed
        assert "KIND" not in rows[rows.index(next(r for r in rows if r.startswith("ACTOR")))]


def test_once_prints_one_plain_frame(loaded: Up) -> None:
    r = subprocess.run([*NALAR, "top", "--once"], env=dict(loaded.env, COLUMNS="80"), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\x1b" not in r.stdout and r.stderr == "", r  # no colour, no cursor movement: not a terminal
    rows = r.stdout.splitlines()
    assert max(len(x) for x in rows) <= 80, rows
    assert _queued(r.stdout) > 0 and "routes Prio: 1 session" in r.stdout, r.stdout
    assert re.search(r"^n1\s+up\s", r.stdout, re.M) and "q quits" not in r.stdout, r.stdout


def test_no_deployment_is_one_line_and_the_connect_status(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    r = subprocess.run([*NALAR, "top", "--nats", url, "--timeout", "1"], env=node_env({"NALAR_HOME": str(tmp_path)}),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and r.stdout == "", r
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("nalar: ") and url in r.stderr, r.stderr


@needs_tmux
def test_a_deployment_that_goes_away_shows_as_silent_not_a_crash(tmp_path: Path, pane) -> None:
    up = Up(tmp_path / "home", "sample_actors:Pin")
    try:
        p = pane(up.env, _top())
        p.wait(lambda s: re.search(r"^n1\s+up\s", s, re.M) is not None, "the node up")
        up.stop()
        screen = p.wait(lambda s: re.search(r"no answer for [1-9]\d* s", s) is not None
                        and re.search(r"^n1\s+stale\s", s, re.M) is not None, "the silence shown")
        assert "TOP-EXIT" not in screen and re.search(r"^Pin\s+n1\s", screen, re.M), screen  # what was last seen
        p.keys("C-c")
        after = p.wait(lambda s: "STTY-DONE" in s, "top to quit on Ctrl-C")
        assert "TOP-EXIT=130" in after and re.search(r"(?<![-\w])icanon\b", after), after
    finally:
        up.stop()


FORGER = r"""
import asyncio, sys
import nats
from nalar.bus import envelope as env

ESC = "\x1b]52;c;cHduZWQ=\x07\x1b[2J"
FORGED = [  # what a forger with a node's credential could answer to a status request
    {"node": "forged-1", "control": [1], "actors": ["A"], "decisions": {"version": "9", "weights": {"A": {"i": "x"}}}},
    {"node": "forged-2" + ESC, "actors": {"A" + ESC: {"waiting": [{"session": ESC, "wait_ms": "slow"}],
                                                        "engine": [1], "instances": "x"}}},
    ["not", "an", "object"],
    {"node": 7},
]


async def main():
    nc = await nats.connect(sys.argv[1])

    async def on(msg):
        for st in FORGED:
            await nc.publish(msg.reply, env.encode_result(st))

    await nc.subscribe(sys.argv[2], cb=on)
    await nc.flush()
    print("forger ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_forged_statuses_neither_crash_top_nor_reach_the_terminal(nats_url: str, namespace: str) -> None:
    """Statuses of the wrong shapes and names with escape sequences (a forger's, or an HTTP client's
    session id shown under 'waiting longest'): top shows what it can, as ``?`` for control characters."""
    forger = subprocess.Popen([sys.executable, "-c", FORGER, nats_url, f"nalar.{namespace}.status"],
                              stdout=subprocess.PIPE, text=True, env=node_env())
    try:
        assert forger.stdout is not None and "forger ready" in forger.stdout.readline()
        r = subprocess.run([*NALAR, "top", "--once", "--nats", nats_url, "--namespace", namespace],
                           capture_output=True, text=True, timeout=60, env=node_env({"COLUMNS": "100"}))
        assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
        assert "forged-1" in r.stdout and "forged-2?]52" in r.stdout, r.stdout
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", r.stdout), repr(r.stdout)
    finally:
        forger.kill()
        forger.wait()
