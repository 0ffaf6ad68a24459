"""The ``batchable`` hint: real node processes, real calls, batches counted where the method runs.

Under load a batchable tool is invoked with full batches (its queue drains into them), idle it runs
each call alone after at most its wait; each call keeps its own result, error, deadline and
cancellation.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

import nalar
from nalar.bus.errors import Cancelled, DeadlineExceeded, RemoteError


def test_batches_fill_under_load_and_are_singletons_when_idle(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:Embedder")
    e = client.stub("Embedder", timeout=60)
    for t in ("a", "bb", "ccc"):  # one at a time: each alone, after its wait at most
        t0 = time.monotonic()
        assert e.embed(t).result(30) == len(t)
        assert time.monotonic() - t0 < 5
    assert e.seen().result(30) == [1, 1, 1]
    texts = [f"text-{i}" * (i % 5 + 1) for i in range(64)]
    futs = [e.embed(t) for t in texts]
    assert [f.result(60) for f in futs] == [len(t) for t in texts]  # each caller its own result
    sizes = e.seen().result(30)[3:]
    assert sum(sizes) == 64 and max(sizes) == 8, sizes
    assert sizes.count(8) >= 6, sizes  # the queue drains into full batches (the first may be short)
    # keyword arguments batch too, one list per keyword; calls of another shape are batched apart
    mixed = [e.embed("ab", scale=3), e.embed("abc"), e.embed("x", scale=10)]
    assert [f.result(30) for f in mixed] == [6, 3, 10]


def test_errors_stay_with_their_call(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:Embedder")
    e = client.stub("Embedder", timeout=60, retry=nalar.NO_RETRY)
    futs = [e.embed(t) for t in ("good", "bad-one", "fine", "bad-two")]
    assert futs[0].result(30) == 4 and futs[2].result(30) == 4
    for f, t in ((futs[1], "bad-one"), (futs[3], "bad-two")):
        with pytest.raises(RemoteError, match=f"bad input '{t}'") as ei:
            f.result(30)
        assert ei.value.type == "ValueError" and ei.value.future_id == f.id
    whole = [e.embed(t) for t in ("x", "explode", "y")]  # the invocation itself raised: every call has it
    for f in whole:
        with pytest.raises(RemoteError, match="the whole batch failed"):
            f.result(30)
    short = [e.embed(t) for t in ("p", "short")]
    for f in short:
        with pytest.raises(RemoteError, match="one result per call") as ei:
            f.result(30)
        assert ei.value.type == "TypeError"


def test_cancellation_and_deadlines_are_per_call(start_node: Any, client: nalar.Client) -> None:
    start_node("sample_batch:SlowGather")
    s = client.stub("SlowGather", timeout=60)
    lone = s.work("alone")
    lone.cancel()  # while its batch forms (the window is 300 ms)
    with pytest.raises(Cancelled):
        lone.result(5)
    kept, dropped = s.work("keep"), s.work("drop")
    dropped.cancel()
    assert kept.result(30) == "KEEP"
    with pytest.raises(Cancelled):
        dropped.result(5)
    quick = client.stub("SlowGather", timeout=0.5, retry=nalar.NO_RETRY).work("slow-quick")
    patient = s.work("slow-patient")  # the same batch: it runs about a second
    with pytest.raises(DeadlineExceeded):
        quick.result(30)
    assert patient.result(30) == "SLOW-PATIENT"
    calls = s.calls().result(30)
    assert ["alone"] not in calls, calls  # a batch whose every call ended was never run
    assert sorted(sum(calls, [])) == sorted(["keep", "slow-quick", "slow-patient"]), calls


def test_a_stateful_batchable_actor_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="both stateful and batchable"):
        @nalar.hints(stateful=True, batchable=True)
        class Both(nalar.Agent):
            def f(self, x: int) -> int:
                return x
    with pytest.raises(ValueError, match="max_batch_size"):
        nalar.hints(batchable=True, max_batch_size=0)(type("T", (nalar.Tool,), {"f": lambda self, x: x}))
    with pytest.raises(ValueError, match="not public methods"):
        from nalar.actors.hints import batched_methods, hints_of

        @nalar.hints(batchable="nope")
        class Wrong(nalar.Tool):
            def f(self, x: int) -> int:
                return x
        batched_methods(hints_of(Wrong), ["f"])
