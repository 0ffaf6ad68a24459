"""An OpenAI-compatible HTTP server as an engine (``engine = "openai:http://vllm:8000/v1"``).

Meant for ``vllm serve`` (its extras ``ignore_eos`` and ``seed`` are sent), and works with any server
that speaks ``/completions`` and ``/chat/completions``. Every call is one streamed HTTP request over
a shared connection pool, so concurrent calls reach the server together and it batches them; a
cancelled call (deadline, the caller's cancel) closes its stream, which makes vLLM abort the request.

``engine_args``: ``model`` (default: the first of ``GET /models``), ``api_key`` (default
``$OPENAI_API_KEY``), ``timeout_s``, ``max_connections``. ``chat`` goes to ``/chat/completions`` so the
server applies the model's own chat template.

Errors: nothing listening is a ``ConnectionError`` naming the URL; a 4xx is a ``ValueError`` with the
server's message (the request was at fault); a 5xx or a broken stream is a ``RuntimeError``. A URL in
an error never carries its credentials or query values (``shown_url``): the error goes to callers.

Stats: ``running`` counts this engine's requests in flight. Where the server exports Prometheus
metrics (vLLM's ``/metrics``), ``stats()`` reads them at most once a second, in the background, and
reports the server's running/waiting requests, KV-cache use and prefix-cache hit rate instead. The
read is always a task on the engine's own loop (the one it started on, which owns the HTTP pool),
whichever thread asks: a caller on another thread (``LLM.engine_stats`` is a ``def``, run on the
instance's thread) schedules it there, and ``fresh_stats()`` waits for it, so asking once is enough.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import orjson

from .api import Completion, Engine, EngineStats, SamplingParams, now_ms

log = logging.getLogger("nalar.models.openai")

#: How often (at most) the server's /metrics is read, and for how long a reading counts as current.
METRICS_EVERY_S = 1.0
METRICS_FRESH_S = 5.0
#: How long one read of /metrics may take (``fresh_stats`` waits at most this, plus a little).
METRICS_TIMEOUT_S = 2.0


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600, max_connections: int = 256) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"openai: needs a base URL such as http://vllm:8000/v1, not {base_url!r}")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, not {timeout_s!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive int, not {max_connections!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.timeout_s = float(timeout_s)
        self.max_connections = max_connections
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.metrics_url = root + "/metrics"
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._requests = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        # the server's /metrics
        self._metrics: dict[str, float] = {}
        self._metrics_at = 0.0  # monotonic time of the last good reading
        self._metrics_tried = 0.0
        self._metrics_off_until = 0.0  # after a failure: back off (a server without /metrics)
        self._metrics_task: asyncio.Task[None] | None = None
        self._prefix_base: tuple[float, float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the engine started on

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=self.max_connections,
                                max_keepalive_connections=min(self.max_connections, 64)))
        if self.model is None:
            got = await self._get_json("/models")
            data = got.get("data") if isinstance(got, dict) else None
            if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise RuntimeError(f"{shown_url(self.base_url)}/models lists no model; name one in "
                                   "engine_args['model']")
            self.model = str(data[0]["id"])

    async def stop(self) -> None:
        t, self._metrics_task = self._metrics_task, None
        if t is not None:
            t.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"the engine for {shown_url(self.base_url)} is not started")
        return self._client

    # -- requests ----------------------------------------------------------------------------------
    async def _get_json(self, path: str) -> Any:
        url = self.base_url + path
        try:
            r = await self._http().get(url)
        except httpx.TransportError as e:
            raise _transport_error(e, url) from None
        _raise_for_status(r.status_code, r.content, url)
        try:
            return orjson.loads(r.content)
        except orjson.JSONDecodeError:
            raise RuntimeError(f"{shown_url(url)} answered with something that is not JSON: {r.text[:200]!r}") from None

    def _body(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p,
                                "stream": True, "stream_options": {"include_usage": True}}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extra; sent only when asked for
        return body

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The server-sent chunks of one streamed request (closing the stream aborts the request)."""
        url = self.base_url + path
        self._in_flight += 1
        try:
            async with self._http().stream("POST", url, content=orjson.dumps(body),
                                           headers={"Content-Type": "application/json"}) as r:
                if r.status_code >= 400:
                    _raise_for_status(r.status_code, await r.aread(), url)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise RuntimeError(f"{shown_url(url)} sent a malformed event: {data[:200]!r}") from None
                    if isinstance(chunk, dict) and "error" in chunk:
                        err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                        code = err.get("code")
                        _raise_for_status(code if isinstance(code, int) and code >= 400 else 500,
                                          orjson.dumps(chunk), url)
                    if isinstance(chunk, dict):
                        yield chunk
        except httpx.TransportError as e:
            raise _transport_error(e, url) from None
        finally:
            self._in_flight -= 1

    async def _run(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        async for chunk in self._stream(path, body):
            for choice in chunk.get("choices") or ():
                if chat:
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                yield text, choice
            if chunk.get("usage"):
                yield "", {"usage": chunk["usage"]}

    async def _complete(self, path: str, body: dict[str, Any], chat: bool) -> Completion:
        async for piece in self._pieces(path, body, chat):
            if isinstance(piece, Completion):
                return piece
        raise RuntimeError(f"{shown_url(self.base_url + path)}: the stream ended without a completion")

    async def _pieces(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[str | Completion]:
        """The text pieces of one streamed request as they come, then its ``Completion``."""
        t0 = now_ms()
        ttft = 0.0
        parts: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        chunks = 0
        async for text, choice in self._run(path, body, chat):
            if "usage" in choice:
                usage = choice["usage"] or {}
                continue
            if text:
                chunks += 1
                parts.append(text)
                if not ttft:
                    ttft = now_ms() - t0
                yield text
            finish = choice.get("finish_reason") or finish
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        self._requests += 1
        self._prompt_tokens += prompt_tokens
        self._cached_tokens += cached
        yield Completion(text="".join(parts), prompt_tokens=prompt_tokens,
                         completion_tokens=int(usage.get("completion_tokens") or chunks),
                         finish_reason="length" if finish == "length" else "stop", engine=self.name,
                         cached_tokens=cached, ttft_ms=round(ttft, 3), latency_ms=round(now_ms() - t0, 3))

    async def generate(self, prompt: str, params: SamplingParams, session: str | None = None) -> Completion:
        body = self._body(params)
        body["prompt"] = prompt
        return await self._complete("/completions", body, chat=False)

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams,
                   session: str | None = None) -> Completion:
        """A chat through ``/chat/completions``: the server formats it with the model's own template."""
        body = self._body(params)
        body["messages"] = messages
        return await self._complete("/chat/completions", body, chat=True)

    async def stream(self, prompt: str, params: SamplingParams,
                     session: str | None = None) -> AsyncIterator[str | Completion]:
        body = self._body(params)
        body["prompt"] = prompt
        async for piece in self._pieces("/completions", body, chat=False):
            yield piece

    async def stream_chat(self, messages: list[dict[str, str]], params: SamplingParams,
                          session: str | None = None) -> AsyncIterator[str | Completion]:
        body = self._body(params)
        body["messages"] = messages
        async for piece in self._pieces("/chat/completions", body, chat=True):
            yield piece

    # -- stats -------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        now = time.monotonic()
        self._maybe_poll(now)
        own_hit = self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0
        extra: dict[str, Any] = {"in_flight": self._in_flight, "requests": self._requests}
        m = self._metrics
        if self._fresh(now):
            extra["source"] = "server"
            hit = own_hit
            if "hits" in m and "queries" in m:
                base_h, base_q = self._prefix_base or (0.0, 0.0)
                q = m["queries"] - base_q
                hit = (m["hits"] - base_h) / q if q > 0 else 0.0
            return EngineStats(running=int(m.get("running", self._in_flight)), waiting=int(m.get("waiting", 0)),
                               kv_usage=float(m.get("kv", 0.0)), prefix_hit_rate=hit, extra=extra)
        extra["source"] = "client"
        return EngineStats(running=self._in_flight, waiting=0, prefix_hit_rate=own_hit, extra=extra)

    async def fresh_stats(self) -> EngineStats:
        """``stats()`` after a read of ``/metrics`` if the last one is stale (waits at most about
        ``METRICS_TIMEOUT_S``; a server without metrics is not asked again for 30 s)."""
        if not self._fresh(time.monotonic()):
            t = self._launch_poll()
            if t is not None:  # past the timeout, report what we have; the read goes on
                await asyncio.wait({t}, timeout=METRICS_TIMEOUT_S + 0.5)
        return self.stats()

    def _fresh(self, now: float) -> bool:
        return bool(self._metrics) and now - self._metrics_at <= METRICS_FRESH_S

    def _maybe_poll(self, now: float) -> None:
        """Start a read of ``/metrics`` on the engine's loop if one is due; never blocks, any thread."""
        loop = self._loop
        if loop is None or self._client is None:
            return
        if now - self._metrics_tried < METRICS_EVERY_S or now < self._metrics_off_until:
            return  # a racy read off the loop at worst schedules one launch too many: it re-checks
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            self._launch_poll()
            return
        try:
            loop.call_soon_threadsafe(self._launch_poll)
        except RuntimeError:
            pass  # the loop is closed: the engine is going away

    def _launch_poll(self) -> "asyncio.Task[None] | None":
        """On the engine's loop: the read of ``/metrics`` in progress, or a new one if due (at most
        one at a time, once per ``METRICS_EVERY_S``, none while backing off); ``None`` if not due."""
        t = self._metrics_task
        if t is not None and not t.done():
            return t
        now = time.monotonic()
        if self._client is None or now - self._metrics_tried < METRICS_EVERY_S or now < self._metrics_off_until:
            return None
        self._metrics_tried = now
        self._metrics_task = asyncio.get_running_loop().create_task(self._poll_metrics())
        return self._metrics_task

    async def _poll_metrics(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            r = await client.get(self.metrics_url, timeout=METRICS_TIMEOUT_S)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            m = parse_vllm_metrics(r.text)
            if not m:
                raise RuntimeError("no vLLM metrics in the answer")
        except Exception as e:
            log.debug("no metrics from %s (%r); trying again in 30 s", self.metrics_url, e)
            self._metrics_off_until = time.monotonic() + 30.0
            return
        if self._prefix_base is None and "hits" in m and "queries" in m:
            self._prefix_base = (m["hits"], m["queries"])  # the hit rate counts from our start
        self._metrics = m
        self._metrics_at = time.monotonic()


#: Prometheus series -> our names (vLLM's names; the older ``gpu_`` ones too).
_SERIES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:gpu_cache_usage_perc": "kv",
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:gpu_prefix_cache_hits_total": "hits",
    "vllm:gpu_prefix_cache_queries_total": "queries",
}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The series in ``_SERIES`` from Prometheus text, summed over labels (engines; ``kv``: their
    mean). Where a quantity has two names (an old and a new one), the first in ``_SERIES`` wins."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        i = 0
        while i < len(line) and line[i] not in "{ ":
            i += 1
        name, rest = line[:i], line[i:]
        if name not in _SERIES:
            continue
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1:]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, float] = {}
    for name, key in _SERIES.items():
        if name in sums and key not in out:
            out[key] = sums[name] / counts[name] if key == "kv" else sums[name]
    return out


def shown_url(url: str) -> str:
    """``url`` as an error may show it: no user or password, query values masked (an API key can
    ride in either). Only on the failure path, so parsed each time."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "(the engine's URL)"
    netloc = p.netloc.rpartition("@")[2]
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(p.query, keep_blank_values=True))
    return urlunsplit((p.scheme, netloc, p.path, query, ""))


def _transport_error(e: httpx.TransportError, url: str) -> Exception:
    url = shown_url(url)
    if isinstance(e, httpx.TimeoutException):
        return TimeoutError(f"{url} did not answer in time ({type(e).__name__})")
    if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError)):
        return ConnectionError(f"cannot reach the OpenAI-compatible server at {url}: {e or type(e).__name__}")
    return ConnectionError(f"the connection to {url} failed: {type(e).__name__}: {e}")


def _raise_for_status(status: int, content: bytes, url: str) -> None:
    if status < 400:
        return
    message = _server_message(content)
    url = shown_url(url)
    if 400 <= status < 500:
        raise ValueError(f"{url} refused the request (HTTP {status}): {message}")
    raise RuntimeError(f"{url} failed (HTTP {status}): {message}")


def _server_message(content: bytes) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``; older vLLM:
    ``{"message": ...}``), else the body's start."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content[:500].decode("utf-8", "replace").strip() or "(no message)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:2000]
        if isinstance(err, str):
            return err[:2000]
        if body.get("message"):
            return str(body["message"])[:2000]
        if body.get("detail"):
            return str(body["detail"])[:2000]
    return str(body)[:500]
