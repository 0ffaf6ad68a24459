"""The decision table and the policy primitives, without a server: op validation, versions, snapshots;
each op class and metrics row on its own."""
from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from nalar import MalformedMessage
from nalar.actors.control import (KINDS, Affinity, DecisionTable, Home, InstanceAt, InstanceRow, Migrate, Op, Order,
                                  Priority, Route, Scale, Sticky, WaitingRow, Weights, op_from_wire)
from nalar.policy import Actions, InstanceView, View

GOOD = [
    ["instance", "P-a-0", "a"], ["instance", "P-b-0", "b"],
    ["route", "s1", "P", "P-b-0"], ["affinity", "s2", "P", "P-a-0"],
    ["weights", "P", {"P-a-0": 1, "P-b-0": 0.5}],
    ["priority", "s1", 5, None], ["priority", "s1", 9, "Q"],
    ["scale", "b", "P", 2, ["P-b-0"]],
    ["migrate", "m1", "s3", "P", "P-a-0", "P-b-0"],
]

BAD = [
    None, [], "route", ["nope", "s"], ["route", "s", "P"], ["route", "", "P", "i"], ["route", "s", 3, "i"],
    ["route", "s", "P", 7], ["affinity", "s", "P", "i", "extra"],
    ["weights", "P", [1, 2]], ["weights", "P", {"i": -1}], ["weights", "P", {"i": True}], ["weights", "P", {"i": "1"}],
    ["weights", "", None],
    ["priority", "s", 1.5, None], ["priority", "s", True, None], ["priority", "s", "1", None], ["priority", "s", 1],
    ["priority", "s", 1, ""], ["priority", "s", 1, None, "x"],
    ["migrate", "id", "s", "P", "src"], ["migrate", "id", "s", "P", 1, "dst"], ["migrate", "", "s", "P", "a", "b"],
    ["scale", "n", "P", -1, []], ["scale", "n", "P", True, []], ["scale", "n", "P", 1.0, []],
    ["scale", "n", "P", 1, "P-n-0"], ["scale", "n", "P", 1, [3]], ["scale", "n", "P", 1],
    ["instance", "i"], ["instance", "i", 5], ["instance", "", "n"],
    ["order", "*", 0, 30], ["order", "*", -1, 30], ["order", "*", True, 30], ["order", "*", 1, -1],
    ["order", "*", 1, None], ["order", "*", "1", 30], ["order", "", 1, 30], ["order", "*", 1],
    ["order", "*", float("nan"), 30], ["order", "*", 1, float("inf")],
]


def wire(ops: list[Op] | None) -> list[list[Any]]:
    return [op.to_wire() for op in ops or []]


def test_well_formed_ops_pass():
    for op in GOOD:
        assert op_from_wire(op).to_wire() == op
    for op in (["route", "s", "P", None], ["weights", "P", None], ["priority", "s", None, None],
               ["scale", "n", "P", None, []], ["instance", "i", None]):
        assert op_from_wire(op).to_wire() == op


@pytest.mark.parametrize("op", BAD, ids=[repr(op)[:40] for op in BAD])
def test_malformed_ops_are_refused(op):
    with pytest.raises(MalformedMessage):
        op_from_wire(op)


@pytest.mark.parametrize("msg", [{}, {"v": "1", "ops": []}, {"v": True, "ops": []}, {"v": 1, "ops": {}},
                                 {"v": 1.0, "ops": []}, {"v": 1, "prev": 0}])
def test_malformed_batches_are_refused(msg):
    t = DecisionTable()
    with pytest.raises(MalformedMessage):
        t.apply(msg)
    assert t.version == 0


def test_a_batch_with_one_bad_op_applies_nothing():
    t = DecisionTable()
    with pytest.raises(MalformedMessage):
        t.apply({"v": 1, "prev": 0, "ops": [["route", "s", "P", "i"], ["scale", "n", "P", -3, []]]})
    assert t.version == 0 and t.routes == {} and not t.active


def test_versions_apply_in_order_and_stale_or_gapped_batches_are_ignored():
    t = DecisionTable()
    assert wire(t.apply({"v": 1, "prev": 0, "ops": GOOD})) == GOOD
    assert t.version == 1 and t.routes == {"P": {"s1": "P-b-0", "s3": "P-b-0"}}  # a migrate moves the route
    assert t.apply({"v": 1, "prev": 0, "ops": [["route", "s1", "P", "P-a-0"]]}) is None  # a duplicate
    assert t.apply({"v": 0, "prev": -1, "ops": [["route", "s1", "P", "P-a-0"]]}) is None  # stale
    assert t.apply({"v": 3, "prev": 2, "ops": [["route", "s1", "P", "P-a-0"]]}) is None  # v2 was missed
    assert t.apply({"v": 2, "ops": [["route", "s1", "P", "P-a-0"]]}) is None  # no prev: not in order either
    assert t.version == 1 and t.routes["P"]["s1"] == "P-b-0"
    assert t.apply({"v": 2, "prev": 1, "ops": [["route", "s1", "P", None], ["weights", "P", None]]})
    assert t.version == 2 and "s1" not in t.routes["P"] and t.weights == {}


def test_a_full_snapshot_replaces_the_table_whatever_its_version():
    t = DecisionTable()
    t.apply({"v": 7, "full": True, "ops": GOOD})
    assert t.version == 7
    got = t.apply({"v": 2, "full": True, "ops": [["instance", "P-a-0", "a"], ["route", "s9", "P", "P-a-0"],
                                                 ["priority", "s1", 5, None]]})
    assert t.version == 2
    assert t.routes == {"P": {"s9": "P-a-0"}} and t.affinity == {} and t.weights == {} and t.scale == {}
    assert t.instances == {"P-a-0": "a"} and t.priorities == {"s1": {"*": 5}}
    # what was dropped comes back as clearing ops first, so enforcement (weights, queues, counts) undoes it
    assert wire(got)[:3] == [["weights", "P", None], ["priority", "s1", None, "Q"], ["scale", "b", "P", None, []]]
    assert wire(got)[3:] == [["instance", "P-a-0", "a"], ["route", "s9", "P", "P-a-0"], ["priority", "s1", 5, None]]


def test_a_snapshot_round_trips():
    t = DecisionTable()
    t.apply({"v": 4, "full": True, "ops": GOOD})
    u = DecisionTable()
    u.apply({"v": t.version, "full": True, "ops": copy.deepcopy(wire(t.snapshot_ops()))})
    for attr in ("version", "instances", "routes", "affinity", "weights", "priorities", "scale"):
        assert getattr(u, attr) == getattr(t, attr), attr
    assert u.summary() == t.summary()


def test_reading_the_table():
    t = DecisionTable()
    assert t.node_for("P", "s1") is None and not t.active
    t.apply({"v": 1, "prev": 0, "ops": GOOD})
    assert t.node_for("P", "s1") == "b"  # hard route
    assert t.node_for("P", "s2") == "a"  # affinity
    assert t.instance_for("P", "s1") == ("P-b-0", True) and t.instance_for("P", "s2") == ("P-a-0", False)
    assert t.instance_for("P", None) == (None, False)
    assert {t.node_for("P", None) for _ in range(200)} == {"a", "b"}  # weights 1 : 0.5
    t.apply({"v": 2, "prev": 1, "ops": [["weights", "P", {"P-a-0": 0, "P-b-0": 2}]]})
    assert {t.node_for("P", "other") for _ in range(50)} == {"b"}
    t.apply({"v": 3, "prev": 2, "ops": [["weights", "P", {"P-a-0": 0, "P-b-0": 0}]]})
    assert t.node_for("P", None) is None  # nowhere by weight: the queue group
    assert t.node_for("P", "s1") == "b"
    assert t.priority("s1", "P", 0) == 5 and t.priority("s1", "Q", 0) == 9 and t.priority("s4", "P", 1) == 1
    t.apply({"v": 4, "prev": 3, "ops": [["priority", "s1", None, None], ["instance", "P-b-0", None]]})
    assert t.priority("s1", "P", 0) == 0 and t.priority("s1", "Q", 0) == 9
    assert t.node_for("P", "s1") is None  # its instance is gone: the route points nowhere


# -- the primitives -------------------------------------------------------------------------------------
def _metrics(node: str, actor: str, instances: list[list[Any]], lo: int = 1, hi: int | None = 3) -> dict[str, Any]:
    return {"node": node, "actors": {actor: {"kind": "tool", "stateful": False, "min": lo, "max": hi, "queued": 0,
                                             "running": 0, "instances": instances, "waiting": []}}}


def _view(table: DecisionTable | None = None, draining: bool = False) -> View:
    m = {"a": _metrics("a", "P", [["P-a-0", 0, 0, 1, False], ["P-a-1", 0, 0, 1, draining]]),
         "b": _metrics("b", "P", [["P-b-0", 0, 0, 1, False]])}
    return View(m, table or DecisionTable(), 1)


def test_provision_and_kill_stay_within_min_and_max():
    act = Actions(_view())
    assert not act.provision("P", "a")  # 3 already: max_instances=3
    assert act.kill("P-a-1") and act.kill("P-b-0")
    assert not act.kill("P-a-0")  # the last one
    assert act.provision("P", "b")
    assert len(act.refused) == 2
    ops = [op for op in wire(act.batch()) if op[0] == "scale"]
    assert ops == [["scale", "a", "P", 1, ["P-a-1"]], ["scale", "b", "P", 1, ["P-b-0"]]]
    with pytest.raises(ValueError):
        act.kill("P-zz-0")
    assert not act.provision("Nope", "a") and not act.provision("P", "zz")


def test_killing_an_instance_already_on_its_way_out_changes_nothing():
    act = Actions(_view())
    assert act.kill("P-a-1") and act.kill("P-a-1")  # twice in a round: once
    assert [op for op in wire(act.batch()) if op[0] == "scale"] == [["scale", "a", "P", 1, ["P-a-1"]]]
    t = DecisionTable()
    t.apply({"v": 1, "prev": 0, "ops": [["scale", "a", "P", 1, ["P-a-1"]]]})
    act = Actions(_view(t, draining=True))  # next round: it is draining, and a policy says it again
    assert act.kill("P-a-1")
    assert [op for op in wire(act.batch()) if op[0] == "scale"] == []
    assert act.kill("P-b-0")  # P-a-0 and P-b-0 are live: one may go
    assert not act.kill("P-a-0")


def test_a_batch_leaves_out_what_is_already_in_force():
    t = DecisionTable()
    act = Actions(_view(t))
    act.route("s", "P", "P-a-0")
    act.route("P", ["P-a-0", "P-b-0"], [1, 2])
    act.set_priority("s", 4)
    first = wire(act.batch())
    assert {op[0] for op in first} == {"instance", "route", "weights", "priority"}
    t.apply({"v": 1, "prev": 0, "ops": first})
    act = Actions(_view(t))
    act.route("s", "P", "P-a-0")
    act.route("P", ["P-a-0", "P-b-0"], [1.0, 2.0])
    act.set_priority("s", 4)
    assert wire(act.batch()) == []
    with pytest.raises(ValueError):
        act.route("P", ["P-a-0"], [1, 2])
    with pytest.raises(ValueError):
        act.set_priority("s", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        act.migrate("s", "P-a-0", "P-x-0")


# -- built-in policies on a made-up deployment ------------------------------------------------------------
def _actor(kind: str, instances: list[list[Any]], queued: int = 0, wait_ms: float = 0.0, lo: int = 1,
           hi: int | None = None, waiting: list[list[Any]] | None = None) -> dict[str, Any]:
    return {"kind": kind, "stateful": False, "min": lo, "max": hi, "queued": queued, "running": 0,
            "wait_ms": wait_ms, "instances": instances, "waiting": waiting or []}


def test_reassign_moves_an_instance_only_when_both_halves_are_allowed():
    from nalar.policy.builtin import Reassign

    def view(hot_max: int | None) -> View:
        m = {"a": {"node": "a", "actors": {
            "Hot": _actor("tool", [["Hot-a-0", 1, 5, 1, False]], queued=5, wait_ms=900, hi=hot_max),
            "Cold": _actor("tool", [["Cold-a-0", 0, 0, 1, False], ["Cold-a-1", 0, 0, 1, False]])}}}
        return View(m, DecisionTable(), 10)

    act = Actions(view(None))
    Reassign().decide(act.view, act)
    assert sorted(op[:4] for op in wire(act.batch()) if op[0] == "scale") == [["scale", "a", "Cold", 1],
                                                                             ["scale", "a", "Hot", 2]]
    act = Actions(view(1))  # Hot may not grow: Cold keeps its instance
    Reassign().decide(act.view, act)
    assert [op for op in wire(act.batch()) if op[0] == "scale"] == []


def test_head_of_line_skips_calls_queued_where_no_instance_is_left():
    from nalar.policy.builtin import HeadOfLine

    m = {"a": {"node": "a", "actors": {"P": _actor("tool", [["P-a-0", 0, 0, 1, True]], queued=1,
                                                   waiting=[["s0", None, 500.0, 0, 0, 0]])}},
         "b": {"node": "b", "actors": {"P": _actor("tool", [["P-b-0", 1, 1, 1, False]], queued=1,
                                                   waiting=[["s1", "P-b-0", 400.0, 0, 0, 0]])}},
         "c": {"node": "c", "actors": {"P": _actor("tool", [["P-c-0", 0, 0, 1, False]])}}}
    act = Actions(View(m, DecisionTable(), 1))
    HeadOfLine().decide(act.view, act)
    assert [op[2:] for op in wire(act.batch()) if op[0] == "migrate"] == [["s1", "P", "P-b-0", "P-c-0"]]


# -- cache affinity: home, soft migration, the policy ----------------------------------------------------
def test_home_places_sessions_softly_and_moves_few_when_instances_change():
    assert op_from_wire(["home", "P", ["P-a-0"]]) and op_from_wire(["home", "P", None])
    assert op_from_wire(["migrate", "m", "s", "P", "P-a-0", "P-b-0", "soft"]).soft
    for bad in (["home", "P", []], ["home", "P", [1]], ["home", "", None], ["migrate", "m", "s", "P", "a", "b", "hard"]):
        with pytest.raises(MalformedMessage):
            op_from_wire(bad)
    insts = ["P-a-0", "P-a-1", "P-b-0", "P-b-1"]
    t = DecisionTable(here="a")
    t.apply({"v": 1, "prev": 0, "ops": [*(["instance", i, i.split("-")[1]] for i in insts), ["home", "P", insts]]})
    sessions = [f"s{k}" for k in range(400)]
    homes = {s: t.instance_for("P", s) for s in sessions}
    assert all(not hard for _, hard in homes.values())  # soft
    count = {i: sum(h == i for h, _ in homes.values()) for i in insts}
    assert all(70 <= n <= 130 for n in count.values()), count  # spread over all four
    assert all(t.node_for("P", s) == homes[s][0].split("-")[1] for s in sessions[:20])
    assert t.instance_for("P", None) == (None, False)  # calls without a session are not placed
    # one instance gone: only its sessions move
    t.apply({"v": 2, "prev": 1, "ops": [["home", "P", insts[:3]]]})
    moved = [s for s in sessions if t.instance_for("P", s)[0] != homes[s][0]]
    assert moved and all(homes[s][0] == "P-b-1" for s in moved)
    # affinity and routes come first; a soft migration leaves affinity, not a route
    t.apply({"v": 3, "prev": 2, "ops": [["affinity", "s1", "P", "P-b-1"], ["route", "s2", "P", "P-a-1"],
                                        ["migrate", "m", "s3", "P", "P-a-0", "P-b-0", "soft"]]})
    assert t.instance_for("P", "s1") == ("P-b-1", False) and t.instance_for("P", "s2") == ("P-a-1", True)
    assert t.affinity["P"]["s3"] == "P-b-0" and "s3" not in t.routes.get("P", {})
    assert ["home", "P", insts[:3]] in wire(t.snapshot_ops())
    cleared = t.apply({"v": 9, "full": True, "ops": []})
    assert ["home", "P", None] in wire(cleared) and not t.home


def _model_metrics(instances: list[list[Any]], waiting: list[list[Any]], recent: list[list[str]]) -> dict[str, Any]:
    return {"a": {"node": "a", "actors": {"M": {
        "kind": "model", "stateful": False, "min": 1, "max": None, "queued": sum(i[2] for i in instances),
        "running": sum(i[1] for i in instances), "instances": instances, "waiting": waiting, "recent": recent}}}}


def test_the_affinity_policy_homes_new_sessions_on_the_lightest_instance_and_pins_the_served():
    from nalar.policy.builtin import CacheAffinity

    insts = [["M-a-0", 4, 3, 4, False], ["M-a-1", 4, 0, 4, False], ["M-a-2", 1, 0, 4, False]]
    waiting = [["long", "M-a-0", 6000.0, 1, 0, 0], ["long", "M-a-0", 5500.0, 1, 0, 0],
               ["short", "M-a-0", 100.0, 1, 0, 0]]
    p = CacheAffinity()
    table = DecisionTable()
    act = Actions(View(_model_metrics(insts, waiting, [["s1", "M-a-0"], ["s2", "M-a-1"]]), table, 1))
    p.decide(act.view, act)
    ops = wire(act.batch())
    assert ["home", "M", ["M-a-2"]] in ops  # new sessions: the fewest calls running + waiting (1 of 7, 4, 1)
    # every session served stays with its cache, so the next change of home moves nobody
    assert ["affinity", "s1", "M", "M-a-0"] in ops and ["affinity", "s2", "M", "M-a-1"] in ops
    moves = [op for op in ops if op[0] == "migrate"]
    assert [op[2:] for op in moves] == [["long", "M", "M-a-0", "M-a-2", "soft"]]  # the long wait, to room
    table.apply({"v": 1, "prev": 0, "ops": ops})
    assert table.instance_for("M", "s1") == ("M-a-0", False) and table.instance_for("M", "new") == ("M-a-2", False)
    even = [["M-a-0", 2, 0, 4, False], ["M-a-1", 1, 1, 4, False], ["M-a-2", 2, 0, 4, False]]
    act = Actions(View(_model_metrics(even, waiting, []), table, 2))
    p.decide(act.view, act)
    ops = wire(act.batch())
    assert not [op for op in ops if op[0] == "home"]  # a tie keeps the current home: no table change
    assert not [op for op in ops if op[0] == "migrate"]  # moved a moment ago: it settles first
    act = Actions(View(_model_metrics([["M-a-0", 0, 0, 4, False], *even[1:]], [], []), table, 3))
    p.decide(act.view, act)
    assert ["home", "M", ["M-a-0"]] in wire(act.batch())
    full = [["M-a-0", 4, 3, 4, False], ["M-a-1", 4, 1, 4, False], ["M-a-2", 4, 0, 4, False]]
    act = Actions(View(_model_metrics(full, [["w", "M-a-0", 9000.0, 1, 0, 0]], []), DecisionTable(), 3))
    CacheAffinity().decide(act.view, act)
    assert not [op for op in wire(act.batch()) if op[0] == "migrate"]  # no instance has room: waiting is all there is


def test_head_of_line_moves_a_model_session_softly_and_a_stateful_one_by_route():
    from nalar.policy.builtin import HeadOfLine

    insts = [["M-a-0", 4, 2, 4, False], ["M-a-1", 0, 0, 4, False]]
    m = _model_metrics(insts, [["s", "M-a-0", 500.0, 1, 0, 0]], [])
    act = Actions(View(m, DecisionTable(), 1))
    HeadOfLine().decide(act.view, act)
    assert [op[2:] for op in wire(act.batch()) if op[0] == "migrate"] == [["s", "M", "M-a-0", "M-a-1", "soft"]]
    m["a"]["actors"]["M"]["kind"] = "actor"
    act = Actions(View(m, DecisionTable(), 1))
    HeadOfLine().decide(act.view, act)
    assert [op[2:] for op in wire(act.batch()) if op[0] == "migrate"] == [["s", "M", "M-a-0", "M-a-1"]]


def test_the_affinity_policy_forgets_the_oldest_sessions_past_its_cap_and_after_keep_rounds():
    from nalar.policy.builtin import CacheAffinity

    insts = [["M-a-0", 1, 0, 4, False], ["M-a-1", 0, 0, 4, False]]
    p = CacheAffinity(keep_rounds=5, max_sessions=2)
    table = DecisionTable()

    def round_(n: int, recent: list[list[str]]) -> list[list[Any]]:
        act = Actions(View(_model_metrics(insts, [], recent), table, n))
        p.decide(act.view, act)
        ops = wire(act.batch())
        table.apply({"v": table.version + 1, "prev": table.version, "ops": ops})
        return ops

    round_(1, [["s1", "M-a-0"], ["s2", "M-a-0"]])
    round_(2, [["s1", "M-a-1"]])  # s1 served again (moved): now the newest
    ops = round_(3, [["s3", "M-a-0"]])
    assert ["affinity", "s2", "M", None] in ops  # the oldest goes when a third would pass the cap
    assert set(table.affinity["M"]) == {"s1", "s3"}
    round_(7, [])
    assert set(table.affinity["M"]) == {"s3"}  # s1 was last set in round 2: 5 rounds ago


# -- each op kind on its own -----------------------------------------------------------------------------
EXAMPLES = [  # (wire form, typed op, what it sets in an empty table)
    (["route", "s", "P", "P-a-0"], Route("s", "P", "P-a-0"), lambda t: t.routes == {"P": {"s": "P-a-0"}}),
    (["affinity", "s", "P", "P-a-0"], Affinity("s", "P", "P-a-0"), lambda t: t.affinity == {"P": {"s": "P-a-0"}}),
    (["weights", "P", {"P-a-0": 1, "P-b-0": 0.5}], Weights("P", {"P-a-0": 1, "P-b-0": 0.5}),
     lambda t: t.weights == {"P": {"P-a-0": 1.0, "P-b-0": 0.5}}),
    (["priority", "s", 3, None], Priority("s", 3), lambda t: t.priorities == {"s": {"*": 3}}),
    (["priority", "s", -2, "Q"], Priority("s", -2, "Q"), lambda t: t.priorities == {"s": {"Q": -2}}),
    (["migrate", "m", "s", "P", "P-a-0", "P-b-0"], Migrate("m", "s", "P", "P-a-0", "P-b-0"),
     lambda t: t.routes == {"P": {"s": "P-b-0"}} and not t.affinity.get("P")),
    (["migrate", "m", "s", "P", "P-a-0", "P-b-0", "soft"], Migrate("m", "s", "P", "P-a-0", "P-b-0", True),
     lambda t: t.affinity == {"P": {"s": "P-b-0"}} and not t.routes.get("P")),
    (["scale", "n", "P", 2, ["P-n-0"]], Scale("n", "P", 2, ["P-n-0"]),
     lambda t: t.scale == {"n": {"P": (2, ["P-n-0"])}}),
    (["instance", "P-a-0", "a"], InstanceAt("P-a-0", "a"), lambda t: t.instances == {"P-a-0": "a"}),
    (["sticky", "P", ["P-a-0", "P-b-0"]], Sticky("P", ["P-a-0", "P-b-0"]),
     lambda t: t.sticky == {"P": ["P-a-0", "P-b-0"]}),
    (["home", "P", ["P-a-0"]], Home("P", ["P-a-0"]), lambda t: t.home == {"P": ["P-a-0"]}),
    (["order", "*", 2.0, 30.0], Order("*", 2.0, 30.0), lambda t: t.order == {"*": (2.0, 30.0)}),
]


def test_the_examples_cover_every_kind():
    assert {raw[0] for raw, _, _ in EXAMPLES} == set(KINDS)
    assert all(cls.KIND == kind for kind, cls in KINDS.items())


@pytest.mark.parametrize("raw,op,sets", EXAMPLES, ids=[repr(e[0])[:40] for e in EXAMPLES])
def test_an_op_reads_writes_and_applies_its_wire_form(raw, op, sets):
    got = op_from_wire(copy.deepcopy(raw))
    assert got == op and type(got) is KINDS[raw[0]] and type(got).from_wire(copy.deepcopy(raw)) == op
    assert op.to_wire() == raw and op_from_wire(op.to_wire()) == op
    t = DecisionTable()
    assert not op.unchanged(t)
    t.apply_op(op)
    assert sets(t)
    assert op.unchanged(t) is not isinstance(op, Migrate)  # a migration is an action: always carried out
    if not isinstance(op, Migrate):  # state: the snapshot gives it back
        assert list(type(op).in_force(t)) == [op] and t.snapshot_ops() == [op]


@pytest.mark.parametrize("raw,op,sets", [e for e in EXAMPLES if hasattr(e[1], "cleared")],
                         ids=[repr(e[0])[:40] for e in EXAMPLES if hasattr(e[1], "cleared")])
def test_an_enforced_op_has_a_key_and_an_op_that_clears_it(raw, op, sets):
    t = DecisionTable()
    op.apply(t)
    undo = op.cleared()
    assert type(undo) is type(op) and undo.key() == op.key() and not undo.unchanged(t)
    undo.apply(t)
    assert undo.unchanged(t) is not isinstance(op, Scale)  # "no count wanted" is always sent, as before
    assert t.snapshot_ops() == [] and not any(
        (t.weights, t.priorities, t.sticky, t.home, *t.scale.values()))
    assert op_from_wire(undo.to_wire()) == undo


REFUSED = [
    (Route, ["route", "s", "P"], "has 3 fields, not 4"),
    (Route, ["affinity", "s", "P", "i"], "must be a list starting with 'route'"),
    (Route, ("route", "s", "P", "i"), "must be a list starting with 'route'"),
    (Route, ["route", "", "P", "i"], "session must be a non-empty string"),
    (Route, ["route", "s", 3, "i"], "actor must be a non-empty string"),
    (Affinity, ["affinity", "s", "P", 7], "instance must be a non-empty string"),
    (Weights, ["weights", "P", {"i": -1}], "weights must map instance ids to numbers >= 0"),
    (Weights, ["weights", "P", {"i": True}], "weights must map instance ids to numbers >= 0"),
    (Weights, ["weights", "", None], "actor must be a non-empty string"),
    (Priority, ["priority", "s", True, None], "priority must be an int or null"),
    (Priority, ["priority", "s", 1, ""], "actor must be a non-empty string"),
    (Priority, ["priority", "s", 1], "has 3 fields, not 4"),
    (Migrate, ["migrate", "m", "s", "P", "a", "b", "hard"], "has 7 fields, not 6"),
    (Migrate, ["migrate", "m", "s", "P", "a", 3], "dst must be a non-empty string"),
    (Migrate, ["migrate", "", "s", "P", "a", "b"], "id must be a non-empty string"),
    (Scale, ["scale", "n", "P", -1, []], "scale count must be an int >= 0 or null"),
    (Scale, ["scale", "n", "P", 1.0, []], "scale count must be an int >= 0 or null"),
    (Scale, ["scale", "n", "P", 1, "P-n-0"], "scale drain must be a list of instance ids"),
    (InstanceAt, ["instance", "i", 5], "node must be a non-empty string"),
    (InstanceAt, ["instance", "i"], "has 2 fields, not 3"),
    (Sticky, ["sticky", "P", []], "sticky instances must be a non-empty list of instance ids, or null"),
    (Home, ["home", "P", [1]], "home instances must be a non-empty list of instance ids, or null"),
]


@pytest.mark.parametrize("cls,raw,why", REFUSED, ids=[repr(r[1])[:40] for r in REFUSED])
def test_an_op_class_refuses_a_malformed_wire_form(cls, raw, why):
    with pytest.raises(MalformedMessage, match=re.escape(why)):
        cls.from_wire(raw)
    if isinstance(raw, list) and raw[0] == cls.KIND:  # the dispatcher says the same
        with pytest.raises(MalformedMessage, match=re.escape(why)):
            op_from_wire(raw)


@pytest.mark.parametrize("raw", [None, [], ("route", "s", "P", "i"), ["nope", "s"], [["route"], "s", "P", "i"], [3]])
def test_an_op_of_no_known_kind_is_refused(raw):
    with pytest.raises(MalformedMessage, match="must be a list starting with one of"):
        op_from_wire(raw)


def test_what_counts_as_unchanged():
    t = DecisionTable()
    t.apply({"v": 1, "prev": 0, "ops": [["weights", "P", {"a": 1, "b": 0.3}], ["scale", "n", "P", 2, ["x"]],
                                        ["priority", "s", 4, None]]})
    assert Weights("P", {"a": 1.0, "b": 0.3 + 1e-12}).unchanged(t)  # the same weights, give or take rounding
    assert not Weights("P", {"a": 1.0}).unchanged(t) and not Weights("P", None).unchanged(t)
    assert Weights("Q", None).unchanged(t)  # no weights, and none wanted
    assert Scale("n", "P", 2, []).unchanged(t)  # the count is what matters, not which would drain
    assert not Scale("n", "P", 1, ["x"]).unchanged(t) and not Scale("m", "P", None, []).unchanged(t)
    assert Priority("s", 4).unchanged(t) and not Priority("s", 4, "P").unchanged(t)
    assert Priority("other", None).unchanged(t) and Route("s", "P", None).unchanged(t)
    assert not Migrate("m", "s", "P", "a", "b").unchanged(t)


# -- metrics rows -----------------------------------------------------------------------------------------
def test_metrics_rows_round_trip_through_json():
    import orjson

    r = InstanceRow("P-a-0", 1, 2, None, False)
    assert r.to_wire() == ["P-a-0", 1, 2, None, False]
    assert InstanceRow.from_wire(orjson.loads(orjson.dumps(r.to_wire()))) == r
    w = WaitingRow("s", None, 12.5, 1, 0, 3)
    assert w.to_wire() == ["s", None, 12.5, 1, 0, 3]
    assert WaitingRow.from_wire(orjson.loads(orjson.dumps(w.to_wire()))) == w
    assert WaitingRow("s", "P-a-0", 0.0, 0, 2, -1) == WaitingRow.from_wire(["s", "P-a-0", 0, 0, 2, -1])
    assert isinstance(WaitingRow.from_wire(["s", None, 7, 0, 0, 0]).wait_ms, float)


@pytest.mark.parametrize("raw", [None, ["i", 0, 0, 1], ["i", 0, 0, 1, False, 9], ["", 0, 0, 1, False],
                                 [3, 0, 0, 1, False], ["i", -1, 0, 1, False], ["i", 0, 1.5, 1, False],
                                 ["i", True, 0, 1, False], ["i", 0, 0, "1", False], ["i", 0, 0, 1, 0]])
def test_a_malformed_instance_row_is_refused(raw):
    with pytest.raises(MalformedMessage):
        InstanceRow.from_wire(raw)


@pytest.mark.parametrize("raw", [None, {"session": "s"}, ["s", None, 1.0, 0, 0],
                                 ["s", "", 1.0, 0, 0, 0], ["s", 3, 1.0, 0, 0, 0], ["s", None, "1", 0, 0, 0],
                                 ["s", None, True, 0, 0, 0], ["s", None, 1.0, 0.5, 0, 0], ["s", None, 1.0, 0, None, 0],
                                 ["s", None, 1.0, 0, 0, False]])
def test_a_malformed_waiting_row_is_refused(raw):
    with pytest.raises(MalformedMessage):
        WaitingRow.from_wire(raw)


def test_the_view_reads_rows_and_skips_a_malformed_one():
    m = {"a": _metrics("a", "P", [["P-a-0", 1, 2, 4, False]])}
    m["a"]["actors"]["P"]["waiting"] = [["s", None, 30.0, 2, 1, 5]]
    v = View(m, DecisionTable(), 1)
    assert v.instances["P-a-0"] == InstanceView("P-a-0", "P", "a", 1, 2, 4, False)
    [w] = v.actors["P"].waiting
    assert (w.session, w.instance, w.routed, w.wait_ms, w.stage, w.reentries, w.priority) == \
        ("s", "P-a-0", False, 30.0, 2, 1, 5)  # unrouted: shown at its node's first live instance
    bad = {"a": _metrics("a", "P", [["P-a-0", 1, 2, 4], ["P-a-1", 0, 0, 4, False]])}
    bad["a"]["actors"]["P"]["waiting"] = [["s", None, "soon", 2, 1, 5], ["t", None, 1.0, 0, 0, 0]]
    v = View(bad, DecisionTable(), 1)  # one bad row costs that row, not the round
    assert list(v.instances) == ["P-a-1"] and [w.session for w in v.actors["P"].waiting] == ["t"]
    assert v.malformed_rows == 2


# -- weights(), and route() in its two meanings -----------------------------------------------------------
def test_weights_and_route_with_instances_record_the_same_op():
    act = Actions(_view())
    act.weights("P", ["P-a-0", "P-b-0"], [1, 2])
    act.route("P", ["P-a-0", "P-b-0"], [1, 2])  # the design's name for it
    act.weights("P", ("P-a-0", "P-b-0"))  # equal shares
    act.weights("P", None)
    act.route("P", None)
    act.route("s", "P", "P-a-0")
    assert act.ops == [Weights("P", {"P-a-0": 1.0, "P-b-0": 2.0})] * 2 + [
        Weights("P", {"P-a-0": 1.0, "P-b-0": 1.0}), Weights("P", None), Weights("P", None), Route("s", "P", "P-a-0")]
    for bad in ((["P-a-0"], [1, 2]), (["P-a-0"], [-1]), (["P-x-0"], None)):
        with pytest.raises(ValueError):
            act.weights("P", *bad)


def test_a_waiting_row_of_the_empty_session_is_read():
    """``session=""`` is a session id callers may use; its row must not fail the policy round."""
    assert WaitingRow.from_wire(["", None, 1.0, 0, 0, 0]).session == ""
