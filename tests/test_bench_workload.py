"""``nalar bench WORKLOAD`` end to end, small and fast: both configurations, the JSON line, the files.

Real node processes, a real embedded nats-server and the simulated engine at 20x its profile's speed.
What is asserted is the harness's contract (every turn accounted for, the last line's fields, plots
written, the baseline's static binding and nalar's policies in force), not latency: that belongs to
the benchmark runs quoted in the README.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import node_env

FIELDS = {"p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput_rps", "failed"}


@pytest.mark.timeout(240)
def test_bench_router_compare_prints_one_json_line_and_writes_results(tmp_path: Path):
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, "-m", "nalar.cli.main", "bench", "router", "--rps", "6", "--duration", "2",
                        "--compare", "--json", "--speed", "20", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=220, env=node_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["workload"] == "router" and last["rps"] == 6 and last["simulated"] is True
    assert last["engine"].startswith("simulated:")
    for config in ("nalar", "baseline"):
        s = last[config]
        assert FIELDS <= set(s), s
        assert s["failed"] == 0 and s["completed"] == s["turns"] > 0, s
        assert not s["policy_errors"], s
    assert last["baseline"]["provisioned"] == 0  # the baseline never moves model instances
    assert set(last["nalar_vs_baseline"]) >= {"p95_ms_lower_pct", "p99_ms_lower_pct", "speedup_mean"}
    saved = json.loads((out / "result.json").read_text())
    assert saved["rows"][-1]["nalar"]["completed"] == last["nalar"]["completed"]
    assert len(saved["turns"]["nalar@6"]) == last["nalar"]["turns"]
    assert (out / "cdf.png").stat().st_size > 1000 and (out / "latency_over_time.png").exists()


@pytest.mark.timeout(240)
def test_bench_drives_a_workload_and_calls_through_the_gateway(tmp_path: Path):
    """``--via http``: a workload's turns, and the calls benchmark's, through a gateway process; the
    calls benchmark reports the gateway's overhead against the direct client of the same run."""
    p = subprocess.run([sys.executable, "-m", "nalar.cli.main", "bench", "router", "--rps", "6", "--duration", "2",
                        "--json", "--speed", "20", "--no-progress", "--via", "http", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=220, env=node_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["via"] == "http" and last["nalar"]["failed"] == 0 and last["nalar"]["completed"] > 0, last
    p = subprocess.run([sys.executable, "-m", "nalar.cli.main", "bench", "calls", "--via", "http", "--repeat", "1",
                        "--calls", "100", "--seconds", "0.5", "--inflight", "20", "--json"],
                       capture_output=True, text=True, timeout=220, env=node_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["http_rps"] > 0 and last["http_p50_us"] > 0 and "gateway_overhead_p50_us" in last, last
    assert last["raw_rps"] > 0 and last["json_rps"] > 0 and last["ratio_json"] > 0 and last["sync_ratio_json"] > 0, last
    assert "raw nats-py + orjson decode/encode" in p.stdout
    assert "gateway overhead per request at p50" in p.stdout


def test_bench_refuses_bad_arguments_clearly():
    for args, msg in ((["--rps", "0"], "rates must be > 0"), (["--sweep", "1,x"], "comma-separated"),
                      (["--duration", "-1"], "--duration must be > 0")):
        p = subprocess.run([sys.executable, "-m", "nalar.cli.main", "bench", "swe", *args],
                           capture_output=True, text=True, timeout=60, env=node_env())
        assert p.returncode == 2 and msg in p.stderr, p.stderr


@pytest.mark.timeout(180)
def test_bench_batch_runs_the_batched_and_unbatched_tool_side_by_side():
    p = subprocess.run([sys.executable, "-m", "nalar.cli.main", "bench", "batch", "--repeat", "1", "--seconds", "0.5",
                        "--inflight", "64", "--json"], capture_output=True, text=True, timeout=170, env=node_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["batched_rps"] > 0 and last["unbatched_rps"] > 0 and "ratio" in last, last
    assert last["mean_batch"] > 1, last  # 64 calls in flight: the node formed batches, not singletons
