"""vLLM in-process: one ``AsyncLLM`` per model instance (``engine = "vllm:MODEL"``).

``engine_args`` are ``vllm.AsyncEngineArgs`` fields (``max_model_len``, ``enforce_eager``,
``load_format``, ``gpu_memory_utilization``, ...). The engine core runs in child processes that vLLM
starts with multiprocessing *spawn*, so the process that owns the engine must have an
``if __name__ == "__main__"`` guard (``nalar node`` does). Every ``generate`` goes to the engine as
its own request at once, so concurrent calls are batched by vLLM's scheduler; nothing here
serialises them.

Statistics come from the engine core's scheduler: a small stat logger (vLLM's ``StatLoggerBase``,
passed to ``AsyncLLM.from_engine_args(stat_loggers=...)``) keeps the latest ``SchedulerStats``
(running and waiting requests, KV-cache use), which the engine core sends with every batch of
outputs. The prefix-cache hit rate is counted here, from each request's ``num_cached_tokens``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from typing import Any, AsyncGenerator, AsyncIterator, Callable

from .api import SCHEDULER_ARGS, Completion, Engine, EngineStats, SamplingParams, now_ms

log = logging.getLogger("nalar.models.vllm")


class VllmEngine(Engine):
    name = "vllm"
    portable_args = SCHEDULER_ARGS

    def __init__(self, model: str, **engine_args: Any) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError("vllm: needs a model path or name")
        self.model = model
        #: how errors name the model: a local directory by its last part (errors go to callers)
        self.label = model_label(model)
        self.engine_args = dict(engine_args)
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._ids = itertools.count()
        self._prefix = f"nalar-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._in_flight = 0
        self._aborts: set[asyncio.Task[None]] = set()
        # from the scheduler (the stat logger), and our own counts
        self._sched_running = 0
        self._sched_waiting = 0
        self._kv_usage = 0.0
        self._peak_running = 0
        self._stat_updates = 0
        self._generated = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._requests = 0
        self._aborted = 0

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise RuntimeError(f"the vllm engine needs vLLM: pip install 'nalar[vllm]' (CPU) or "
                               f"pip install vllm (GPU) ({e})") from e
        args: dict[str, Any] = {"disable_log_stats": True}  # our stat logger still gets every update
        args.update(self.engine_args)
        try:
            engine_args = AsyncEngineArgs(model=self.model, **args)
        except TypeError as e:
            raise ValueError(f"bad vLLM engine argument for {self.label}: {e}") from None
        loggers = [_stat_logger_factory(self._on_stats)]
        try:
            # Building the engine blocks (the engine core loads the model and profiles memory); a
            # thread keeps the node's loop serving meanwhile. AsyncLLM binds to the loop of its first
            # request, which is this one.
            self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args, stat_loggers=loggers)
        except Exception as e:
            raise RuntimeError(f"vLLM could not start {self.label!r}: {type(e).__name__}: {e}") from e
        self._max_model_len = int(getattr(self._llm.model_config, "max_model_len", 0) or 0)
        try:
            self._tokenizer = self._llm.get_tokenizer()
        except Exception:  # a model served with skip_tokenizer_init: no chat template
            self._tokenizer = None

    async def stop(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        for t in list(self._aborts):
            t.cancel()
        # shutdown() blocks while the engine core and its workers exit (a few seconds).
        await asyncio.to_thread(llm.shutdown)

    # -- generation --------------------------------------------------------------------------------
    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return VSamplingParams(
                max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                seed=params.seed, stop=list(params.stop) or None, ignore_eos=params.ignore_eos,
                output_kind=RequestOutputKind.DELTA)  # each output carries only the new tokens
        except Exception as e:
            raise ValueError(f"vLLM refused the sampling parameters: {e}") from None

    def _need(self) -> Any:
        if self._llm is None:
            raise RuntimeError(f"the vLLM engine for {self.label!r} is not running")
        return self._llm

    async def _outputs(self, prompt: str, params: SamplingParams) -> AsyncGenerator[tuple[str, Any], None]:
        """(text delta, RequestOutput) pairs of one request; aborts it in vLLM if the caller goes away."""
        llm = self._need()
        limit = self._max_model_len
        if limit and params.max_tokens >= limit:
            raise ValueError(f"max_tokens={params.max_tokens} leaves no room for a prompt: the model's "
                             f"context is {limit} tokens (max_model_len)")
        sp = self._sampling(params)
        rid = f"{self._prefix}-{next(self._ids)}"
        self._in_flight += 1
        done = checked = False
        outputs = llm.generate(prompt, sp, rid)
        try:
            async for out in outputs:
                if not checked and out.prompt_token_ids is not None:
                    # As vLLM's OpenAI server does: refuse what cannot fit rather than cut it short
                    # (workloads ask for exact lengths). Known after tokenization; the prefill is spent.
                    checked = True
                    n = len(out.prompt_token_ids)
                    if limit and n + params.max_tokens > limit:
                        raise ValueError(f"the prompt ({n} tokens) plus max_tokens={params.max_tokens} is over "
                                         f"the model's context of {limit} tokens (max_model_len)")
                done = out.finished
                yield (out.outputs[0].text if out.outputs else ""), out
        except (asyncio.CancelledError, GeneratorExit, ValueError):
            raise
        except Exception as e:
            raise _map_error(e, self.label) from e
        finally:
            self._in_flight -= 1
            if not done:
                # Cancelled (deadline, caller's cancel) or failed: make sure the engine drops it.
                # vLLM's generator aborts on cancellation too; aborting an unknown id is a no-op.
                self._abort_later(llm, rid, outputs)

    def _abort_later(self, llm: Any, rid: str, outputs: Any) -> None:
        self._aborted += 1

        async def abort() -> None:
            try:
                await outputs.aclose()  # a generator we left mid-way aborts its request on close
                await llm.abort(rid)
            except Exception:
                log.debug("abort of %s failed", rid, exc_info=True)

        try:
            t = asyncio.get_running_loop().create_task(abort())
        except RuntimeError:
            return
        self._aborts.add(t)
        t.add_done_callback(self._aborts.discard)

    async def generate(self, prompt: str, params: SamplingParams, session: str | None = None) -> Completion:
        t0 = now_ms()
        ttft = 0.0
        parts: list[str] = []
        tokens = 0
        prompt_tokens = cached = 0
        finish: str | None = None
        gen = self._outputs(prompt, params)
        try:
            async for text, out in gen:
                c = out.outputs[0] if out.outputs else None
                if c is not None and c.token_ids and not ttft:
                    ttft = now_ms() - t0
                if out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                if c is not None:
                    parts.append(text)
                    tokens += len(c.token_ids)
                    finish = c.finish_reason or finish
        finally:
            await gen.aclose()
        self._account(prompt_tokens, cached)
        return Completion(text="".join(parts), prompt_tokens=prompt_tokens, completion_tokens=tokens,
                          finish_reason=_finish(finish), engine=self.name, cached_tokens=cached,
                          ttft_ms=round(ttft, 3), latency_ms=round(now_ms() - t0, 3))

    async def stream(self, prompt: str, params: SamplingParams,
                     session: str | None = None) -> AsyncIterator[str | Completion]:
        t0 = now_ms()
        ttft = 0.0
        parts: list[str] = []
        tokens = prompt_tokens = cached = 0
        finish: str | None = None
        gen = self._outputs(prompt, params)
        try:
            async for text, out in gen:
                c = out.outputs[0] if out.outputs else None
                if c is not None and c.token_ids and not ttft:
                    ttft = now_ms() - t0
                if out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                if out.num_cached_tokens is not None:
                    cached = out.num_cached_tokens
                if c is not None:
                    tokens += len(c.token_ids)
                    finish = c.finish_reason or finish
                if text:
                    parts.append(text)
                    yield text
        finally:
            await gen.aclose()
        self._account(prompt_tokens, cached)
        yield Completion(text="".join(parts), prompt_tokens=prompt_tokens, completion_tokens=tokens,
                         finish_reason=_finish(finish), engine=self.name, cached_tokens=cached,
                         ttft_ms=round(ttft, 3), latency_ms=round(now_ms() - t0, 3))

    def _account(self, prompt_tokens: int, cached: int) -> None:
        self._requests += 1
        self._prompt_tokens += prompt_tokens
        self._cached_tokens += cached

    # -- chat and stats ----------------------------------------------------------------------------
    def format_chat(self, messages: list[dict[str, str]]) -> str:
        tok = self._tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return super().format_chat(messages)
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise ValueError(f"the chat template of {self.label} refused these messages: {e}") from None
        # generate() tokenizes with the tokenizer's special tokens (BOS): do not send a second one
        bos = getattr(tok, "bos_token", None)
        if isinstance(bos, str) and bos and text.startswith(bos):
            text = text[len(bos):]
        return str(text)

    def _on_stats(self, stats: Any, iteration: Any) -> None:
        if iteration is not None:
            self._generated += int(getattr(iteration, "num_generation_tokens", 0) or 0)
        if stats is None:
            return
        self._stat_updates += 1
        self._sched_running = int(getattr(stats, "num_running_reqs", 0))
        self._sched_waiting = int(getattr(stats, "num_waiting_reqs", 0)) + int(
            getattr(stats, "num_skipped_waiting_reqs", 0) or 0)
        self._kv_usage = float(getattr(stats, "kv_cache_usage", 0.0))
        self._peak_running = max(self._peak_running, self._sched_running)

    def kv_capacity_tokens(self) -> int | None:
        """GPU (or CPU) KV blocks the engine core allocated, times the block size."""
        try:
            cc = self._llm.vllm_config.cache_config
            n = int(cc.num_gpu_blocks or 0) * int(cc.block_size or 0)
        except Exception:
            return None
        return n or None

    def stats(self) -> EngineStats:
        """``running``: sequences in the engine's running batch; ``waiting``: the rest of the requests
        in flight (queued in the scheduler, or still being tokenized). Both are bounded by the
        requests this engine has in flight, so a stale scheduler report never shows phantom work.
        Nothing here needs the loop (plain reads of what the stat logger recorded there), and
        ``LLM.engine_stats`` calls it on the loop anyway, so the counts are read where they are written."""
        n = self._in_flight
        running = min(self._sched_running, n)
        try:  # requests the engine still holds (the output processor's count): cheap, in-process
            unfinished = int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0
        except Exception:
            unfinished = -1
        return EngineStats(
            running=running, waiting=n - running, kv_usage=self._kv_usage if n else 0.0,
            prefix_hit_rate=self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
            extra={"in_flight": n, "unfinished": unfinished, "peak_running": self._peak_running,
                   "requests": self._requests, "aborted": self._aborted,
                   "generated_tokens": self._generated, "scheduler_running": self._sched_running,
                   "scheduler_waiting": self._sched_waiting, "stat_updates": self._stat_updates})


def _finish(reason: str | None) -> str:
    # vLLM says "length", "stop" or "abort"; anything but a length cut counts as a stop.
    return "length" if reason == "length" else "stop"


def _stat_logger_factory(sink: Callable[[Any, Any], None]) -> Callable[..., Any]:
    """A per-engine ``StatLoggerFactory`` whose logger hands each ``SchedulerStats`` and
    ``IterationStats`` to ``sink``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            sink(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


def model_label(model: str) -> str:
    """A model as an error names it: a Hugging Face id as it is, a local directory by its last part."""
    if os.path.isabs(model) or model.startswith(("./", "../", "~")):
        return os.path.basename(os.path.normpath(os.path.expanduser(model))) or "(a local model)"
    return model


def _map_error(e: Exception, model: str) -> Exception:
    """vLLM's errors as the caller should see them: its fault (``ValueError``) or the engine's."""
    try:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    except ImportError:  # pragma: no cover - a vLLM without these classes
        return e
    if isinstance(e, (VLLMClientError, ValueError, TypeError)):
        return ValueError(f"vLLM refused the request: {e}")
    if isinstance(e, EngineDeadError):
        return RuntimeError(f"the vLLM engine for {model!r} died; the instance must be restarted ({e})")
    if isinstance(e, EngineGenerateError):
        cause = e.__cause__
        return RuntimeError(f"vLLM failed the request: {type(cause).__name__ if cause else ''}: {cause or e}")
    return RuntimeError(f"vLLM failed the request: {type(e).__name__}: {e}")
