"""Errors that cross the wire name nothing of the host they came from (issue 13, point 5).

Real node processes: a user method fails, or nalar fails a call itself, and what the client's
``RemoteError`` carries (message, traceback, the errors of nested calls) holds no absolute path, home
directory, interpreter prefix, state directory, credential or host name, while its traceback still
names each frame (relative file, line number, function, source line) for the developer.
"""
from __future__ import annotations

import inspect
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable

import pytest

import nalar
import sample_actors
from conftest import TESTS

#: ``File "name", line N, in function``, also inside an exception group's ``|`` blocks.
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
#: An absolute path of two parts or more, where a token starts.
ABSOLUTE = re.compile(r"(?:^|[\s'\"(=\[,|:])(/[^\s'\"/]+/[^\s'\"]*)", re.MULTILINE)


def host_details(text: str, *also: str) -> list[str]:
    """What of this host ``text`` names (empty: nothing)."""
    found = [m.group(1) for m in ABSOLUTE.finditer(text)]
    for s in (str(Path.home()), sys.prefix, sys.base_prefix, sys.exec_prefix, str(TESTS), os.getcwd(), *also):
        if s and s != os.sep and s in text:
            found.append(s)
    host = socket.gethostname()
    distinctive = len(host) >= 3 and host != "localhost" and not host.isalpha()  # not a word code or prose may hold
    if distinctive and re.search(rf"(?<![\w]){re.escape(host)}(?![\w])", text):
        found.append(host)
    return found


def wire_texts(e: nalar.RemoteError) -> str:
    """Everything of the error that came over the wire, its nested calls' errors included."""
    parts = [e.message, e.traceback, e.actor, e.method]
    for d in e.chain:
        parts += [str(d.get("message", "")), str(d.get("traceback", ""))]
    return "\n".join(parts)


def line_of(fn: Callable[..., object], needle: str) -> int:
    """The line number of the first line of ``fn`` that holds ``needle``."""
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(src) if needle in line)


def frames(tb: str) -> list[tuple[str, int, str]]:
    return [(f, int(n), fn) for f, n, fn in FRAME.findall(tb)]


def user_frames(tb: str) -> list[tuple[int, str]]:
    """(line, function) of the frames in tests/sample_actors.py, named relative (never absolute)."""
    out = []
    for f, n, fn in frames(tb):
        if os.path.basename(f) == "sample_actors.py":
            assert not os.path.isabs(f), f
            out.append((n, fn))
    return out


def test_a_user_error_names_its_frames_and_not_the_host(start_node, client):
    start_node("sample_actors:Leaky")
    with pytest.raises(nalar.RemoteError) as ei:
        client.stub("Leaky").nested().result(30)
    e = ei.value
    assert (e.type, e.message, e.actor, e.method) == ("ValueError", "bad depth 0", "Leaky", "nested")
    recurse = line_of(sample_actors._leaky_helper, "_leaky_helper(depth - 1)")
    raised = line_of(sample_actors._leaky_helper, "raise ValueError")
    assert user_frames(e.traceback) == [(line_of(sample_actors.Leaky.nested, "_leaky_helper(2)"), "nested"),
                                        (recurse, "_leaky_helper"), (recurse, "_leaky_helper"),
                                        (raised, "_leaky_helper")], e.traceback
    # the source lines stay, and nalar's own frames are named by package, wherever it is installed
    assert 'raise ValueError(f"bad depth {depth}")' in e.traceback
    assert any(f == "nalar/actors/node/execute.py" and fn == "run_sync" for f, _, fn in frames(e.traceback)), e.traceback
    assert e.traceback.rstrip().endswith("ValueError: bad depth 0")
    assert host_details(wire_texts(e)) == [], e.traceback


def test_a_chained_cause_and_a_path_in_a_message_lose_their_directories(start_node, client, tmp_path):
    start_node("sample_actors:Leaky")
    leaky = client.stub("Leaky")
    secret = tmp_path / "secret-config" / "app.toml"  # absent: open() names it in its message
    with pytest.raises(nalar.RemoteError) as ei:
        leaky.chained(str(secret)).result(30)
    e = ei.value
    assert e.type == "RuntimeError" and e.message == "the configuration could not be read"
    tb = e.traceback
    assert "The above exception was the direct cause of the following exception:" in tb
    assert user_frames(tb) == [(line_of(sample_actors.Leaky.chained, "return _read_config"), "chained"),  # the cause
                               (line_of(sample_actors._read_config, "with open(path)"), "_read_config"),
                               (line_of(sample_actors.Leaky.chained, "raise RuntimeError"), "chained")], tb
    assert "FileNotFoundError: [Errno 2] No such file or directory: '.../app.toml'" in tb, tb
    assert host_details(wire_texts(e), str(tmp_path), "secret-config") == [], tb

    with pytest.raises(nalar.RemoteError) as ei:  # a path the user wrote into a message and a source line
        leaky.literal().result(30)
    e = ei.value
    assert e.type == "LookupError" and e.message == "nothing at .../notes.txt"
    assert (line_of(sample_actors.Leaky.literal, "raise LookupError"), "literal") in user_frames(e.traceback)
    assert host_details(wire_texts(e), "someone", "private") == [], e.traceback


def test_an_exception_group_keeps_every_member_frame_relative(start_node, client):
    start_node("sample_actors:Leaky")
    with pytest.raises(nalar.RemoteError) as ei:
        client.stub("Leaky").grouped().result(30)
    e = ei.value
    tb = e.traceback
    assert e.type == "ExceptionGroup" and "ExceptionGroup: two helpers failed (2 sub-exceptions)" in tb, tb
    assert tb.count("ValueError: bad depth 0") == 2
    raised = line_of(sample_actors._leaky_helper, "raise ValueError")
    assert user_frames(tb).count((raised, "_leaky_helper")) == 2, tb
    assert any(f == "nalar/actors/node/execute.py" and fn == "run_async" for f, _, fn in frames(tb)), tb
    assert host_details(wire_texts(e)) == [], tb


def test_a_full_state_store_says_so_without_its_path(start_node, client, tmp_path):
    """StateFull reaches the caller where the node's LMDB is all there is (no log to hold the commit)."""
    start_node("sample_actors:Counter", name="full",
               env={"NALAR_STATE_LOG": "lmdb-only", "NALAR_STATE_MAX_MAP": str(4 * 1024 * 1024)})
    c = client.stub("Counter").options(session="s", timeout=30)
    full = None
    for i in range(12):  # 1.5 MB values into a 4 MiB map: one of them does not fit
        try:
            c.put_blob(1_500_000 + i).result(30)
        except nalar.StateFull as e:
            full = e
            break
    assert full is not None, "the store never filled up"
    assert full.type == "StateFull" and "full" in full.message and "NALAR_STATE_MAX_MAP" in full.message
    assert host_details(wire_texts(full), str(tmp_path), str(tmp_path / "state")) == [], full.message
    assert c.incr().result(30) == 1  # and the unit goes on


def test_a_stopping_node_does_not_name_itself_or_its_host(start_node, client):
    """A node's default name is its host's name and pid: the calls it cancels on the way out do not carry it."""
    p = start_node("sample_actors:Gate")
    (name,) = re.findall(r"nalar node (\S+) ready on", "".join(p.output))
    assert name.endswith(f"-{p.proc.pid}")  # the default: host-pid
    gate = client.stub("Gate")
    f = gate.options(timeout=120).park(1)
    gate.wait_started(1).result(30)
    p.proc.terminate()  # the grace period passes (the call never finishes), then it is answered
    with pytest.raises(nalar.Cancelled, match="stopping") as ei:
        f.result(60)
    assert name not in str(ei.value) and host_details(wire_texts(ei.value)) == [], str(ei.value)
    assert p.proc.wait(60) == 0


def test_a_model_servers_credentials_stay_out_of_its_errors(start_node, client):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_node("sample_models:DeadOpenAI",
               env={"NALAR_LLM_DEADOPENAI": f"openai:http://alice:s3cr3t-pw@127.0.0.1:{port}/v1"})
    with pytest.raises(nalar.RemoteError) as ei:
        client.stub("DeadOpenAI").generate("hi", max_tokens=2).result(60)
    e = ei.value
    assert e.type == "ConnectionError" and f"127.0.0.1:{port}/v1" in e.message, e.message  # still says where
    text = wire_texts(e)
    assert "s3cr3t-pw" not in text and "alice" not in text, text
    assert host_details(text) == [], text
