"""The simulated engine (its scheduling, KV cache and prefix cache), a model actor served by a node,
and the baseline's static binding (``sticky``) and the ``proportional`` policy.

Engine properties are asserted by what the engine did (steps, tokens, cache hits, waiting
sequences), never by how long it took: the schedule is deterministic, wall time is not.
"""
from __future__ import annotations

import asyncio
import zlib

import pytest

import nalar
from conftest import wait_for
from nalar.actors import control
from nalar.actors.control import DecisionTable, Scale
from nalar.actors.models import Completion, SamplingParams
from nalar.actors.models.simulated import SimEngine
from nalar.policy.api import Actions, View
from nalar.policy.builtin import Proportional, Sticky
from test_control import Ctl, node_status

P = SamplingParams(max_tokens=20, ignore_eos=True)


async def _engine(**kw) -> SimEngine:
    e = SimEngine("llama3-8b-a100", speed=50.0, **kw)
    await e.start()
    return e


# -- the engine ---------------------------------------------------------------------------------------
async def test_concurrent_sequences_share_steps_and_get_exactly_their_tokens():
    e = await _engine()
    try:
        outs = await asyncio.gather(*(e.generate("x" * 400, P, f"s{i}") for i in range(32)))
        assert all(c.completion_tokens == 20 and len(c.text.split()) == 20 for c in outs)
        assert all(c.engine == "simulated:llama3-8b-a100" for c in outs)
        assert e.stats().extra["steps"] < 2 * 20  # batched: not 32 x 20 steps
        solo = await e.generate("y" * 400, SamplingParams(max_tokens=7, ignore_eos=True))
        assert solo.completion_tokens == 7
        free = await e.generate("z", SamplingParams(max_tokens=50))  # without ignore_eos: stops earlier
        assert 1 <= free.completion_tokens <= 50
    finally:
        await e.stop()


async def test_a_full_kv_cache_makes_sequences_wait_and_freed_space_admits_them():
    e = await _engine(kv_capacity_tokens=300)
    try:
        first = asyncio.ensure_future(e.generate("a" * 800, SamplingParams(max_tokens=60, ignore_eos=True)))
        second = asyncio.ensure_future(e.generate("b" * 800, SamplingParams(max_tokens=60, ignore_eos=True)))
        while e.stats().running == 0:
            await asyncio.sleep(0)
        st = e.stats()
        assert (st.running, st.waiting) == (1, 1) and st.kv_usage > 0.5
        assert (await first).completion_tokens == 60 and (await second).completion_tokens == 60
        assert e.stats().running == e.stats().waiting == 0 and e.stats().kv_usage == 0
        with pytest.raises(ValueError, match="exceed the KV cache"):
            await e.generate("c" * 2000, P)
    finally:
        await e.stop()


async def test_a_returning_session_hits_its_prefix_until_evicted():
    e = await _engine(kv_capacity_tokens=2000)
    try:
        t1 = await e.generate("q" * 2000, P, "s1")
        assert t1.cached_tokens == 0
        t2 = await e.generate("q" * 2000 + t1.text + "follow-up", P, "s1")
        assert t2.cached_tokens >= 500 + 20 - 1  # the first prompt and its answer
        other = await e.generate("q" * 2000, P, "s2")  # the same text, another session: no hit
        assert other.cached_tokens == 0
        big = await e.generate("w" * 6000, P, "s3")  # needs the space: evicts s1 (least recently used)
        assert big.cached_tokens == 0
        t3 = await e.generate("q" * 2000 + t1.text + "follow-up", P, "s1")
        assert t3.cached_tokens == 0
        assert 0 < e.stats().prefix_hit_rate < 1
    finally:
        await e.stop()


async def test_a_cancelled_caller_frees_its_kv_and_others_go_on():
    e = await _engine(kv_capacity_tokens=1000)
    try:
        long = asyncio.ensure_future(e.generate("a" * 2400, SamplingParams(max_tokens=300, ignore_eos=True)))
        waiting = asyncio.ensure_future(e.generate("b" * 2400, P))
        while e.stats().waiting == 0:
            await asyncio.sleep(0)
        long.cancel()
        assert (await waiting).completion_tokens == 20
        assert e.stats().kv_usage == 0
    finally:
        await e.stop()


async def test_streaming_yields_the_text_as_it_is_generated():
    e = await _engine()
    try:
        *chunks, done = [c async for c in e.stream("hello", SamplingParams(max_tokens=12, ignore_eos=True))]
        assert len(chunks) > 1 and all(isinstance(c, str) for c in chunks)
        assert len("".join(chunks).split()) == 12
        assert isinstance(done, Completion) and done.text == "".join(chunks) and done.completion_tokens == 12
    finally:
        await e.stop()


def test_bad_settings_and_params_are_clear_errors():
    with pytest.raises(ValueError, match="unknown simulated-engine profile"):
        SimEngine("gpt-9")
    with pytest.raises(ValueError, match="unknown simulated-engine setting"):
        SimEngine("llama3-8b-a100", warp=9)
    for bad in ({"max_tokens": 0}, {"max_tokens": "9"}, {"temperature": -1}, {"top_p": 0}, {"stop": [1]},
                {"ignore_eos": "yes"}, {"nope": 1}):
        with pytest.raises(ValueError):
            SamplingParams.from_kwargs(bad)


# -- a model actor served by a node -------------------------------------------------------------------
def test_a_model_actor_serves_generate_and_chat_and_reports_engine_stats(start_node, client):
    start_node("sample_sim:SimLLM=2", name="m1")
    llm = client.stub("SimLLM", timeout=60)
    outs = [llm.options(session=f"s{i}").generate("tell me " * 20, max_tokens=16, ignore_eos=True) for i in range(12)]
    res = [f.result(60) for f in outs]
    assert all(r["completion_tokens"] == 16 and r["engine"] == "simulated:llama3-8b-a100" for r in res)
    assert {r["instance"] for r in res} <= {"SimLLM-m1-0", "SimLLM-m1-1"}
    chat = llm.chat([{"role": "user", "content": "hi"}], max_tokens=5, ignore_eos=True).result(60)
    assert chat["completion_tokens"] == 5 and chat["prompt_tokens"] > 1
    with pytest.raises(nalar.RemoteError) as e:
        llm.generate("x", max_tokens=-1).result(30)
    assert e.value.type == "ValueError" and "max_tokens" in str(e.value)
    with pytest.raises(nalar.RemoteError):
        llm.chat([{"role": "user"}]).result(30)
    assert llm.generate("still here", max_tokens=3, ignore_eos=True).result(30)["completion_tokens"] == 3
    eng = node_status(client, "m1")["actors"]["SimLLM"]["engine"]
    assert set(eng) == {"SimLLM-m1-0", "SimLLM-m1-1"}
    assert all(v["simulated"] == "llama3-8b-a100" and "kv_usage" in v for v in eng.values())


# -- the baseline's binding ---------------------------------------------------------------------------
def test_sticky_pins_sessions_by_hash_and_round_robins_the_rest(start_node, client):
    start_node("sample_actors:Pin=2", name="sa")
    start_node("sample_actors:Pin=2", name="sb")
    ctl = Ctl(client, ["sa", "sb"], Sticky())
    ctl.round()
    insts = sorted(["Pin-sa-0", "Pin-sa-1", "Pin-sb-0", "Pin-sb-1"])
    wait_for(lambda: client.runtime.table.sticky.get("Pin") == insts, 10, "the sticky binding")
    pin = client.stub("Pin")
    for s in ("alpha", "beta", "gamma", "delta", "eps"):
        want = insts[zlib.crc32(s.encode()) % 4]
        assert {pin.options(session=s).where().result(30) for _ in range(6)} == {want}
    got = [pin.where().result(30) for _ in range(16)]
    assert {g: got.count(g) for g in got} == {i: 4 for i in insts}  # round-robin, one after another
    assert node_status(client, "sa")["decisions"]["sticky"] == {"Pin": insts}


def _model_view(chat_load: int, code_load: int, chat_n: int = 1, code_n: int = 1) -> View:
    def actor(name: str, load: int, n: int, node: str) -> dict:
        return {"kind": "model", "stateful": False, "min": 1, "max": None, "queued": load, "running": 0,
                "instances": [[f"{name}-{node}-{k}", 0, 0, 4, False] for k in range(n)], "waiting": []}
    m = {node: {"node": node, "actors": {"Chat": actor("Chat", chat_load, chat_n, node),
                                         "Code": actor("Code", code_load, code_n, node)}} for node in ("a", "b")}
    return View(m, DecisionTable(), 10)


def test_proportional_moves_model_slots_to_demand_one_per_round_and_keeps_one_each():
    p = Proportional(cooldown_rounds=0)
    act = Actions(_model_view(90, 10))
    p.decide(act.view, act)
    scale = sorted((op for op in act.batch() if isinstance(op, Scale)), key=lambda op: (op.node, op.actor))
    # one slot: a Code drained, a Chat started
    assert [(op.actor, op.count) for op in scale] == [("Chat", 2), ("Code", 0)]
    assert scale[0].node == scale[1].node  # on the same node
    p2 = Proportional(cooldown_rounds=3)
    act = Actions(_model_view(90, 10))
    p2.decide(act.view, act)
    assert [op for op in act.batch() if isinstance(op, Scale)]
    act = Actions(View(act.view.metrics, DecisionTable(), 11))  # the next round: Chat and Code cool down
    p2.decide(act.view, act)
    assert not [op for op in act.batch() if isinstance(op, Scale)]
    act = Actions(_model_view(50, 50))
    p.decide(act.view, act)
    assert not [op for op in act.batch() if isinstance(op, Scale)]  # in proportion already: nothing moves
    act = Actions(_model_view(1, 1))
    p.decide(act.view, act)
    assert not [op for op in act.batch() if isinstance(op, Scale)]  # too little demand to judge


def test_sticky_ops_apply_snapshot_and_clear():
    t = DecisionTable(here="a")
    t.apply({"v": 1, "prev": 0, "ops": [["instance", "P-a-0", "a"], ["instance", "P-b-0", "b"],
                                        ["sticky", "P", ["P-a-0", "P-b-0"]]]})
    assert t.active and t.instance_for("P", None) == ("P-a-0", True)  # round-robin among this node's own
    iid, hard = t.instance_for("P", "sess")
    assert hard and iid == ["P-a-0", "P-b-0"][zlib.crc32(b"sess") % 2]
    assert t.node_for("P", "sess") == iid.split("-")[1]
    assert control.Sticky("P", ["P-a-0", "P-b-0"]) in t.snapshot_ops()  # (the op)
    cleared = t.apply({"v": 5, "full": True, "ops": []})
    assert control.Sticky("P", None) in (cleared or []) and not t.sticky and t.here == "a"
