"""A simulated continuous-batching engine: vLLM's scheduling, with time instead of a GPU.

It keeps what decides latency in a real engine: sequences join and leave a running batch every step;
a step costs more the more sequences and context it carries (``profiles.py``); prompts are prefilled
in chunks within a per-step token budget; a sequence is admitted only when its KV cache fits, so a full
cache makes callers wait; and a session that returns to the instance holding its earlier prompt and
answer (its prefix) skips prefilling that part, until the cache evicts it (LRU, only when space is
needed). It generates filler text, never a model's answer, and names itself ``simulated:PROFILE``
everywhere.

Cheap by design (a benchmark may run hundreds of sequences per instance on two cores): a step costs
O(log n) per finishing sequence, not O(n), because decoding sequences all advance one token per step
and are kept in a heap by the step they finish on.
"""
from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import OrderedDict, deque
from typing import Any, AsyncIterator

from .api import SCHEDULER_ARGS, Completion, Engine, EngineStats, SamplingParams
from .profiles import Profile, profile

_WORDS = ("the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one",
          "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old", "see", "two",
          "way", "who", "boy", "did", "its", "let", "put", "say", "she", "too", "use")


class _Seq:
    __slots__ = ("prompt", "prompt_tokens", "cached", "prefill_left", "out", "session", "fut", "t0", "ttft",
                 "start_step", "finish_step", "reserved", "queue", "produced")

    def __init__(self, prompt: str, prompt_tokens: int, out: int, session: str | None,
                 fut: "asyncio.Future[None]") -> None:
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        self.cached = 0
        self.prefill_left = prompt_tokens
        self.out = out
        self.session = session
        self.fut = fut
        self.t0 = time.monotonic()
        self.ttft = 0.0
        self.start_step = -1
        self.finish_step = -1
        self.reserved = 0
        self.queue: asyncio.Queue[int] | None = None  # streaming: tokens produced so far
        self.produced = 0


class SimEngine(Engine):
    """``sim:PROFILE``. ``speed`` divides every simulated duration (tests run the same schedule faster);
    other keyword arguments override the profile's numbers (e.g. ``kv_capacity_tokens``).

    vLLM's scheduler limits mean here what they mean there, so a model written for vLLM runs on the
    simulation unchanged: ``max_num_seqs``, ``max_num_batched_tokens`` (the profile's
    ``max_batched_tokens``) and ``max_model_len`` (a prompt plus ``max_tokens`` over it is a
    ``ValueError``, as vLLM refuses it)."""

    portable_args = SCHEDULER_ARGS

    def __init__(self, profile_name: str = "llama3-8b-a100", speed: float = 1.0, seed: int = 0,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 **overrides: Any) -> None:
        if not isinstance(speed, (int, float)) or speed <= 0:
            raise ValueError(f"speed must be a number > 0, not {speed!r}")
        for name, v in (("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
                raise ValueError(f"{name} must be an int >= 2, not {v!r}")
        if max_num_batched_tokens is not None:
            if "max_batched_tokens" in overrides:
                raise ValueError("give max_num_batched_tokens (vLLM's name) or max_batched_tokens, not both")
            overrides["max_batched_tokens"] = max_num_batched_tokens
        self.p: Profile = profile(profile_name, **overrides)
        self.max_model_len = max_model_len
        self.name = f"simulated:{self.p.name}"
        self.speed = float(speed)
        self._rng = random.Random(seed)
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._decoding: list[tuple[int, int, _Seq]] = []  # heap of (finish step, tie, seq)
        self._streams: set[_Seq] = set()
        self._tie = 0
        self._step = 0
        self._ctx = 0  # context tokens of running sequences (grows by one per decoding sequence per step)
        self._kv_used = 0  # KV reserved by running sequences (prompt + all of its output, as admitted)
        self._cache: OrderedDict[str, tuple[str, int]] = OrderedDict()  # session -> (text, tokens), LRU
        self._cache_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._prompt_total = 0
        self._cached_total = 0
        self._steps = 0
        self._aborted = 0  # requests whose caller went away (cancel, deadline, a closed stream)

    # -- Engine --------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for s in self._all():
            if not s.fut.done():
                s.fut.set_exception(RuntimeError("the simulated engine stopped"))

    async def generate(self, prompt: str, params: SamplingParams, session: str | None = None) -> Completion:
        s = self._submit(prompt, params, session)
        try:
            await s.fut
        except asyncio.CancelledError:
            self._drop(s)
            raise
        return self._completion(s, params)

    async def stream(self, prompt: str, params: SamplingParams,
                     session: str | None = None) -> AsyncIterator[str | Completion]:
        s = self._submit(prompt, params, session)
        s.queue = asyncio.Queue()
        sent = 0
        try:
            while sent < s.out:
                n = await s.queue.get()
                if n < 0:
                    break
                yield self._text(sent, n)
                sent = n
            await s.fut
        except BaseException:
            self._drop(s)
            raise
        yield self._completion(s, params)

    def kv_capacity_tokens(self) -> int | None:
        return self.p.kv_capacity_tokens

    def stats(self) -> EngineStats:
        running = len(self._prefilling) + len(self._decoding)
        return EngineStats(running, len(self._waiting), self._kv_used / self.p.kv_capacity_tokens,
                           self._cached_total / self._prompt_total if self._prompt_total else 0.0,
                           {"simulated": self.p.name, "steps": self._steps, "cached_sessions": len(self._cache),
                            "aborted": self._aborted})

    # -- requests ------------------------------------------------------------------------------------
    def _tokens(self, text: str) -> int:
        return max(1, int(len(text) / self.p.chars_per_token + 0.5))

    def _submit(self, prompt: str, params: SamplingParams, session: str | None) -> _Seq:
        if self._task is None or self._task.done():
            raise RuntimeError("the simulated engine is not running")
        pt = self._tokens(prompt)
        if self.max_model_len is not None and pt + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({pt} tokens) plus max_tokens={params.max_tokens} is over the model's "
                             f"context of {self.max_model_len} tokens (max_model_len)")
        # Without ignore_eos a real model stops somewhere before max_tokens; draw where, reproducibly.
        out = params.max_tokens if params.ignore_eos else max(1, int(params.max_tokens * self._rng.uniform(0.3, 1.0)))
        if pt + out > self.p.kv_capacity_tokens:
            raise ValueError(f"prompt ({pt} tokens) + max_tokens ({out}) exceed the KV cache "
                             f"({self.p.kv_capacity_tokens} tokens) of simulated profile {self.p.name}")
        s = _Seq(prompt, pt, out, session, asyncio.get_running_loop().create_future())
        self._prompt_total += pt
        self._waiting.append(s)
        self._wake.set()
        return s

    def _completion(self, s: _Seq, params: SamplingParams) -> Completion:
        now = time.monotonic()
        return Completion(self._text(0, s.out), s.prompt_tokens, s.out, "length", self.name,
                          cached_tokens=s.cached, ttft_ms=round((s.ttft - s.t0) * 1000, 3),
                          latency_ms=round((now - s.t0) * 1000, 3))

    def _text(self, start: int, end: int) -> str:
        return "".join(_WORDS[i % len(_WORDS)] + " " for i in range(start, end))

    def _all(self) -> list[_Seq]:
        return [*self._waiting, *self._prefilling, *(e[2] for e in self._decoding)]

    def _drop(self, s: _Seq) -> None:
        """A cancelled caller: free what the sequence holds, as vLLM's abort does. A sequence past its
        prefill leaves its prompt in the prefix cache (vLLM's computed blocks stay, evictable), so a
        preempted call that runs again finds it."""
        self._aborted += 1
        if s in self._waiting:
            self._waiting.remove(s)
            return
        if s in self._prefilling:
            self._prefilling.remove(s)
        else:
            for i, e in enumerate(self._decoding):
                if e[2] is s:
                    self._decoding[i] = self._decoding[-1]
                    self._decoding.pop()
                    heapq.heapify(self._decoding)
                    self._ctx -= s.prompt_tokens + max(0, self._step - s.start_step)
                    break
            else:
                return
            self._kv_used -= s.reserved
            self._streams.discard(s)
            self._keep(s, prompt_only=True)
            return
        self._kv_used -= s.reserved
        self._streams.discard(s)

    # -- prefix cache --------------------------------------------------------------------------------
    def _hit(self, s: _Seq) -> int:
        """Prompt tokens already in the cache: the common prefix with the session's cached text."""
        if s.session is None or s.session not in self._cache:
            return 0
        text, _ = self._cache[s.session]  # (concurrent calls of the session all share it, as blocks are)
        self._cache.move_to_end(s.session)
        a, b = s.prompt, text
        lo, hi = 0, min(len(a), len(b))
        while lo < hi:  # longest common prefix by bisection on C-level slice compares
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return min(s.prompt_tokens - 1, int(lo / self.p.chars_per_token))

    def _keep(self, s: _Seq, prompt_only: bool = False) -> None:
        """A finished sequence's prompt and answer stay cached for its session, evictable (an aborted
        one's prompt alone)."""
        if s.session is None:
            return
        old = self._cache.pop(s.session, None)
        if old is not None:
            self._cache_tokens -= old[1]
        out = 0 if prompt_only else s.out
        tokens = s.prompt_tokens + out
        self._cache[s.session] = (s.prompt + self._text(0, out), tokens)
        self._cache_tokens += tokens
        self._evict(0)

    def _evict(self, need: int) -> bool:
        """Drop least-recently-used cached sessions until ``need`` tokens are free; False if they cannot be."""
        cap = self.p.kv_capacity_tokens
        while self._kv_used + self._cache_tokens + need > cap and self._cache:
            _, (_, t) = self._cache.popitem(last=False)
            self._cache_tokens -= t
        return self._kv_used + need <= cap

    # -- the step loop -------------------------------------------------------------------------------
    def _admit(self, budget: int) -> None:
        """FCFS admission, as vLLM's scheduler: the head waits until the KV cache fits it."""
        p = self.p
        while self._waiting and len(self._prefilling) + len(self._decoding) < p.max_num_seqs and budget > 0:
            s = self._waiting[0]
            if s.cached == 0 and s.prefill_left == s.prompt_tokens:
                s.cached = self._hit(s)
                s.prefill_left = s.prompt_tokens - s.cached
                self._cached_total += s.cached
            need = s.prompt_tokens + s.out
            if not self._evict(need):
                return
            self._waiting.popleft()
            s.reserved = need
            self._kv_used += need
            self._prefilling.append(s)
            budget -= s.prefill_left

    async def _run(self) -> None:
        try:
            await self._steps_forever()
        except Exception as e:  # a bug here must not leave callers waiting forever
            for s in self._all():
                if not s.fut.done():
                    s.fut.set_exception(RuntimeError(f"the simulated engine failed: {e!r}"))
            raise

    async def _steps_forever(self) -> None:
        loop = asyncio.get_running_loop()
        p = self.p
        while True:
            if not (self._waiting or self._prefilling or self._decoding):
                self._wake.clear()
                await self._wake.wait()
            t0 = loop.time()
            decoding = len(self._decoding)
            budget = p.max_batched_tokens - decoding
            self._admit(budget)
            prefill = 0
            done_prefill: list[_Seq] = []
            for s in self._prefilling:  # chunked prefill, oldest first, within the step's budget
                if budget <= 0:
                    break
                chunk = min(s.prefill_left, budget)
                s.prefill_left -= chunk
                budget -= chunk
                prefill += chunk
                if s.prefill_left == 0:
                    done_prefill.append(s)
            ms = p.base_ms + p.per_seq_ms * decoding + p.per_ctx_k_ms * self._ctx / 1000 + p.prefill_ms_per_token * prefill
            await asyncio.sleep(max(0.0, t0 + ms / 1000 / self.speed - loop.time()))
            self._steps += 1
            self._step += 1
            step = self._step
            now = time.monotonic()
            self._ctx += decoding
            done_prefill = [s for s in done_prefill if s in self._prefilling]  # (minus those cancelled)
            for s in done_prefill:  # the prefill step also samples the first token
                self._prefilling.remove(s)
                s.ttft = now
                s.start_step = step
                s.finish_step = step + s.out - 1
                self._ctx += s.prompt_tokens + 1
                self._tie += 1
                heapq.heappush(self._decoding, (s.finish_step, self._tie, s))
            while self._decoding and self._decoding[0][0] <= step:
                _, _, s = heapq.heappop(self._decoding)
                self._ctx -= s.prompt_tokens + s.out
                self._kv_used -= s.reserved
                self._streams.discard(s)
                self._keep(s)
                if s.queue is not None:
                    s.queue.put_nowait(s.out)
                if not s.fut.done():
                    s.fut.set_result(None)
            for s in self._streams:
                s.queue.put_nowait(step - s.start_step + 1)  # type: ignore[union-attr]
            for s in done_prefill:
                if s.queue is not None and s.finish_step > step:
                    self._streams.add(s)
                    s.queue.put_nowait(1)
