"""What every engine of a model actor shares, without vLLM: which ``engine_args`` reach an engine when
``$NALAR_LLM`` switches it, vLLM's scheduler limits on the simulated engine, and engine stats gathered
on the engine's loop whatever thread asks (an OpenAI engine against a Prometheus ``/metrics`` this test
serves, as ``vllm serve`` does: the real server is in test_models_vllm.py).
"""
from __future__ import annotations

import http.server
import logging
import threading
from typing import Any, Iterator

import pytest

import nalar
from nalar.actors.models import SamplingParams
from nalar.actors.models.simulated import SimEngine
from nalar.actors.models.spec import engine_args_for

VLLM_ARGS = {"max_model_len": 8192, "enforce_eager": True, "load_format": "dummy"}


# -- engine_args across a switch of engine --------------------------------------------------------------
def test_engine_args_go_as_written_to_the_engine_they_were_written_for(monkeypatch) -> None:
    monkeypatch.delenv("NALAR_LLM_ARGS", raising=False)
    assert engine_args_for("W", "vllm:m", "vllm:other", VLLM_ARGS) == VLLM_ARGS
    assert engine_args_for("W", "sim:llama3-8b-a100", "sim:llama3-1b-a100", {"speed": 5}) == {"speed": 5}


def test_a_switched_engine_keeps_what_it_honours_and_names_what_it_ignores(monkeypatch, caplog) -> None:
    monkeypatch.delenv("NALAR_LLM_ARGS", raising=False)
    with caplog.at_level(logging.WARNING, "nalar.models"):
        assert engine_args_for("Writer", "vllm:m", "sim", VLLM_ARGS) == {"max_model_len": 8192}
    assert "Writer: engine sim ignores engine_args written for vllm: enforce_eager, load_format" in caplog.text
    assert engine_args_for("W", "vllm:m", "openai:http://h/v1", VLLM_ARGS) == {}  # the server has its own
    assert engine_args_for("W", "sim", "vllm:m", {"kv_capacity_tokens": 9, "max_num_seqs": 8}) == {"max_num_seqs": 8}
    # $NALAR_LLM_ARGS is written for the engine in force: taken whole
    monkeypatch.setenv("NALAR_LLM_ARGS", '{"speed": 50, "max_model_len": 4096}')
    assert engine_args_for("W", "vllm:m", "sim", VLLM_ARGS) == {"max_model_len": 4096, "speed": 50}


async def test_the_simulation_keeps_vllms_scheduler_limits() -> None:
    e = SimEngine(speed=50.0, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=512)
    assert (e.p.max_num_seqs, e.p.max_batched_tokens, e.max_model_len) == (2, 512, 64)
    await e.start()
    try:
        assert (await e.generate("x" * 40, SamplingParams(max_tokens=50, ignore_eos=True))).completion_tokens == 50
        with pytest.raises(ValueError, match="over the model's context of 64 tokens"):
            await e.generate("x" * 40, SamplingParams(max_tokens=60))
    finally:
        await e.stop()
    with pytest.raises(ValueError, match="not both"):
        SimEngine(max_num_batched_tokens=512, max_batched_tokens=512)
    with pytest.raises(ValueError, match="max_model_len"):
        SimEngine(max_model_len=0)
    with pytest.raises(ValueError, match="unknown simulated-engine setting"):  # a typo is still caught
        SimEngine(max_model_length=64)


# -- stats on the engine's loop -------------------------------------------------------------------------
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40.0
"""


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering ``/metrics`` as vLLM's does; the paths it was asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            asked.append(self.path)
            body = METRICS.encode() if self.path == "/metrics" else b"{}"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", asked
    finally:
        srv.shutdown()
        srv.server_close()


class Served(nalar.models.LLM):
    engine = "openai:http://127.0.0.1:9/v1"  # $NALAR_LLM_SERVED, set by the test
    engine_args = {"model": "m", "timeout_s": 10}


def test_engine_stats_asked_once_from_the_instance_thread_read_the_servers_metrics(metrics_server, monkeypatch):
    """``engine_stats`` is a ``def`` (it runs on the instance's thread, where no loop runs): it reads the
    server's /metrics on the engine's loop and answers with them the first time it is asked."""
    url, asked = metrics_server
    monkeypatch.setenv("NALAR_LLM_SERVED", f"openai:{url}")
    with nalar.local(Served) as app:
        st = app.stub(Served).engine_stats().result(30)
        assert st["source"] == "server" and asked == ["/metrics"], (st, asked)
        assert (st["running"], st["waiting"], st["kv_usage"]) == (3, 2, 0.25)
        again = app.stub(Served).engine_stats().result(30)
        assert again["source"] == "server" and asked == ["/metrics"]  # fresh for 5 s: not read again at once
        # the node's own metrics (on the loop, every round) never wait, and see the same reading
        (status,) = app.status()
        (eng,) = status["actors"]["Served"]["engine"].values()
        assert eng["source"] == "server" and eng["running"] == 3


def test_engine_stats_of_the_simulated_engine_from_the_instance_thread() -> None:
    class Sim(nalar.models.LLM):
        engine = "sim"
        engine_args = {"speed": 50.0}

    with nalar.local(Sim) as app:
        llm = app.stub(Sim)
        assert llm.generate("hi", max_tokens=4, ignore_eos=True).result(30)["completion_tokens"] == 4
        st = llm.engine_stats().result(30)
        assert st["simulated"] == "llama3-8b-a100" and st["steps"] >= 4 and st["running"] == 0, st
