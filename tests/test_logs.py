"""Failed calls in a node's log: one line each, text or JSON (``--log-format``), bounded tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Callable

import pytest

import nalar

from conftest import node_env, wait_for

CALLS = "nalar.calls"


def _json_lines(output: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in output:
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_json_log_has_one_line_per_failed_call(client: nalar.Client, start_node: Callable[..., Any]) -> None:
    node = start_node("sample_actors:Calc", "--log-format", "json", "--log-level", "info", name="logjson")
    calc = client.stub("Calc")
    assert calc.add(1, 2).result(30) == 3
    futures = [calc.fail("boom") for _ in range(3)]
    ids = []
    for f in futures:
        with pytest.raises(nalar.RemoteError):
            f.result(30)
        ids.append(f.id)
    with pytest.raises(nalar.RemoteError) as bad:
        calc.nope().result(30)  # refused at intake: an expected kind, no traceback
    assert calc.add(2, 2).result(30) == 4

    def failures() -> list[dict[str, Any]]:
        return [r for r in _json_lines(node.output) if r.get("logger") == CALLS]

    got = wait_for(lambda: len(failures()) >= 4 and failures(), what="four failed-call lines")
    node.stop()
    got = failures()
    assert len(got) == 4, got  # one per failed call, none for the two that succeeded
    fails = [r for r in got if r["call"] == "Calc.fail"]
    assert sorted(r["future_id"] for r in fails) == sorted(ids)
    for r in fails:
        assert r["level"] == "WARNING" and r["actor"] == "Calc" and r["method"] == "fail"
        assert r["error_type"] == "ValueError" and r["error_kind"] == "error" and r["error_message"] == "boom"
        assert r["request_id"] == r["future_id"]  # each is a root call: its own request
        assert r["node"] == "logjson"
        assert "trace_id" not in r  # the caller did not trace
    with_tb = [r for r in fails if "traceback" in r]
    assert len(with_tb) == 1, "the same error's traceback is logged once a minute at most"
    assert "raise ValueError(message)" in with_tb[0]["traceback"]
    nope = next(r for r in got if r["call"] == "Calc.nope")
    assert nope["error_type"] == "UnknownMethod" and nope["error_kind"] == "unknown_method"
    assert nope["future_id"] == bad.value.future_id and "traceback" not in nope
    for line in node.output:  # and nothing else of them on the side (no bare tracebacks)
        assert "Traceback" not in line or line.lstrip().startswith("{"), line


def test_text_log_and_trace_id(start_node: Callable[..., Any], nats_url: str, namespace: str) -> None:
    from test_tracing import Receiver

    receiver = Receiver()
    try:
        node = start_node("sample_actors:Calc", "--log-format", "text", name="logtext")
        script = ("import sys, nalar\n"
                  "c = nalar.connect(sys.argv[1], sys.argv[2])\n"
                  "print(c.stub('Calc').add(1, 1).result(30))\n"
                  "f = c.stub('Calc').fail('text boom')\n"
                  "try:\n    f.result(30)\nexcept nalar.RemoteError:\n    print('FID', f.id)\n"
                  "c.close()\n")
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        run = subprocess.run([sys.executable, "-c", script, nats_url, namespace], env=node_env(otel),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        fid = run.stdout.split("FID ")[1].split()[0]
        spans = receiver.wait(lambda s: any(x["name"] == "call Calc.fail" for x in s))
        trace = next(x["trace"] for x in spans if x["name"] == "call Calc.fail")

        def lines() -> list[str]:
            return [ln for ln in node.output if f" {CALLS}: " in ln]

        wait_for(lambda: lines(), what="a failed-call line")
        node.stop()
        got = lines()
        assert len(got) == 1, node.output  # the successful add logged nothing
        line = got[0]
        assert " WARNING nalar.calls: call failed: Calc.fail error ValueError: text boom" in line, line
        assert f"future={fid}" in line and f"request={fid}" in line and f"trace={trace}" in line, line
        out = "".join(node.output)
        assert "raise ValueError(message)" in out  # its traceback follows, indented, once
        assert out.count("raise ValueError(message)") == 1
    finally:
        receiver.close()


def test_log_setup_from_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """NALAR_LOG_FORMAT / NALAR_LOG_LEVEL stand in for the flags; a bad value falls back with a warning."""
    import logging

    from nalar.actors.node import faillog
    from nalar.bus.envelope import CallMeta
    from nalar.cli import logs

    root = logging.getLogger()
    level = root.level
    try:
        monkeypatch.setenv("NALAR_LOG_FORMAT", "json")
        monkeypatch.setenv("NALAR_LOG_LEVEL", "error")
        logs.setup()
        assert root.level == logging.ERROR
        faillog.failed("A", "m", CallMeta("f1", "r1"), {"kind": "deadline", "type": "DeadlineExceeded"}, "n")
        monkeypatch.setenv("NALAR_LOG_LEVEL", "warning")
        logs.setup()
        faillog.failed("A", "m", CallMeta("f2", "r1", "s1"), {"kind": "deadline", "type": "DeadlineExceeded",
                                                               "message": "late", "traceback": "x"}, "n")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err  # the first was below ERROR
        rec = json.loads(err[0])
        assert rec["call"] == "A.m" and rec["future_id"] == "f2" and rec["request_id"] == "r1"
        assert rec["session"] == "s1" and "traceback" not in rec  # an expected kind: no traceback
        monkeypatch.setenv("NALAR_LOG_FORMAT", "yaml")
        logs.setup()
        assert "NALAR_LOG_FORMAT='yaml'" in capsys.readouterr().err
    finally:
        for h in list(root.handlers):
            if getattr(h, "_nalar", False):
                root.removeHandler(h)
        root.setLevel(level)
