"""The ``resources`` hint, enforced: what nodes have, what instances take, where provision may place them.

Parsing and detection are unit tests; the rest runs real node processes on a real nats-server, with a
``PolicyActor`` in this process driven round by round (``test_control.Ctl``), and the ``reassign``
policy on a View built from metrics as nodes send them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import orjson
import pytest

from conftest import node_env, wait_for
from nalar.actors.control import DecisionTable, Scale
from nalar.actors.node.resources import Capacity, cpus, from_env, gpus, memory_bytes
from nalar.actors.resources import describe, fmt, parse_resources
from nalar.policy.api import Actions, View
from nalar.policy.builtin import Reassign
from test_control import Ctl, instances, node_status

NALAR = [sys.executable, "-m", "nalar.cli.main"]
A, B = "ra", "rb"
GiB = 1 << 30


# -- parsing and detection ------------------------------------------------------------------------------
def test_parse_resources_reads_numbers_and_sizes_in_bytes() -> None:
    assert parse_resources("gpu=4,cpu=8,memory=64GiB") == {"gpu": 4, "cpu": 8, "memory": 64 * GiB}
    assert parse_resources(" gpu = 0.5 , memory=512MB, gpu_memory=80G, memory_b=1") == {
        "gpu": 0.5, "memory": 512e6, "gpu_memory": 80 * GiB, "memory_b": 1}
    assert parse_resources("memory=1048576") == {"memory": 1 << 20}
    assert parse_resources("") == {}
    assert fmt({"memory": 64 * GiB, "gpu": 0.5}) == "gpu=0.5, memory=64 GiB"
    assert describe({"gpu": 2, "memory": GiB}, {"gpu": 1}) == "gpu 1 of 2 used, 1 free; memory 0 B of 1 GiB used, 1 GiB free"


@pytest.mark.parametrize("text, said", [
    ("gpu", "expected name=amount"),
    ("gpu=", "expected name=amount"),
    ("gpu=lots", "expected a number >= 0"),
    ("gpu=-1", "expected a number >= 0"),
    ("gpu=4GiB", "only memory takes a size unit"),
    ("memory=3XB", "unknown size unit"),
    ("gpu=1,gpu=2", "given twice"),
    ("gpu=1,,cpu=2", "an empty entry"),
    ("9gpu=1", "a resource name is"),
])
def test_parse_resources_says_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        parse_resources(text)


def test_defaults_come_from_the_machine_and_declared_amounts_win(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpus() == len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert memory_bytes() == kib * 1024
    if shutil.which("nvidia-smi") is None:
        assert gpus() == 0  # absent: no GPU, at once
    else:
        assert gpus() >= 0
    total = Capacity.for_node(None).total
    assert total["cpu"] == cpus() and total["memory"] == memory_bytes() and total["gpu"] == gpus()
    assert Capacity.for_node({"gpu": 4, "cpu": 2}).total == {"gpu": 4, "cpu": 2, "memory": memory_bytes()}
    assert Capacity.for_node({"gpu": 0}).total["gpu"] == 0
    monkeypatch.setenv("NALAR_RESOURCES", "gpu=2,tpu=1")
    assert from_env() == {"gpu": 2, "tpu": 1}
    monkeypatch.setenv("NALAR_RESOURCES", "gpu=two")
    with pytest.raises(ValueError, match=r"\$NALAR_RESOURCES: gpu='two'"):
        from_env()


def test_capacity_holds_per_instance_and_releases_once() -> None:
    cap = Capacity({"gpu": 2})
    cap.take("g-0", {"gpu": 1})
    token = cap.reserve({"gpu": 1})
    assert cap.lack({"gpu": 1}) == "an instance asks gpu=1, but only gpu=0 is free (of gpu=2)"
    assert cap.lack({"tpu": 1}) == "an instance asks tpu=1, but only tpu=0 is free (of tpu=0)"
    cap.rename(token, "g-1")
    cap.release("g-1")
    cap.release("g-1")  # idempotent
    assert cap.status() == {"total": {"gpu": 2}, "used": {"gpu": 1}, "free": {"gpu": 1}}
    assert cap.lack({"gpu": 1}) is None and cap.lack({"gpu": 1}, 2) is not None


# -- node start -----------------------------------------------------------------------------------------
def test_a_node_starts_what_fits_and_refuses_the_rest_in_one_line(start_node, client, nats_url, namespace):
    start_node("sample_resources:Gpu=1", "--resources", "gpu=1", name=A)
    assert node_status(client, A)["resources"] == {"total": {"gpu": 1, "cpu": cpus(), "memory": memory_bytes()},
                                                  "used": {"gpu": 1}, "free": {"gpu": 0, "cpu": cpus(),
                                                                               "memory": memory_bytes()}}
    args = ["node", "sample_resources:Gpu=2", "--nats", nats_url, "--namespace", namespace, "--name", "rx"]
    r = subprocess.run([*NALAR, *args, "--resources", "gpu=1"], capture_output=True, text=True, timeout=60,
                       env=node_env())
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "nalar: Gpu: instance 2 of 2 does not fit on node rx: an instance asks gpu=1, but only gpu=0 is free "
        "(of gpu=1); start fewer instances, or declare more (--resources)"], r.stderr
    # $NALAR_RESOURCES declares it too; no GPU declared on a machine without one: none fits
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60,
                       env=node_env({"NALAR_RESOURCES": "gpu=0"}))
    assert r.returncode == 2 and "instance 1 of 2 does not fit" in r.stderr and "(of gpu=0)" in r.stderr, r
    r = subprocess.run([*NALAR, *args, "--resources", "gpu=one"], capture_output=True, text=True, timeout=60,
                       env=node_env())
    assert r.returncode == 2 and "argument --resources: gpu='one': expected a number >= 0" in r.stderr, r
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60,
                       env=node_env({"NALAR_RESOURCES": "gpu=1,gpu=2"}))
    assert r.returncode == 2 and r.stderr.strip() == "nalar: $NALAR_RESOURCES: 'gpu' is given twice in 'gpu=1,gpu=2'", r


# -- provision, kill, status ----------------------------------------------------------------------------
def test_provision_places_only_where_it_fits_and_a_kill_frees_the_room(start_node, client, nats_url, namespace):
    start_node("sample_resources:Gpu=1", "--resources", "gpu=1", name=A)  # full
    start_node("sample_resources:Gpu=0", env={"NALAR_RESOURCES": "gpu=2"}, name=B)  # room for two
    ctl = Ctl(client, [A, B])
    said: list[bool] = []
    ctl.round(lambda v, act: said.extend([act.provision("Gpu", A), act.provision("Gpu", B)]))
    assert said == [False, True]
    refused = client.policy_status()["refused"]
    assert refused == [f"provision(Gpu, {A}): no room on {A}: an instance asks gpu=1, but only gpu=0 is free "
                       "(of gpu=1)"], refused
    wait_for(lambda: len(instances(client, B, "Gpu")) == 1, 30, "an instance on B")
    assert node_status(client, B)["resources"]["used"] == {"gpu": 1}

    said.clear()  # a second fits on B, a third does not (the policy counts this round's first)
    ctl.round(lambda v, act: said.extend([act.provision("Gpu", B), act.provision("Gpu", B)]))
    assert said == [True, False]
    assert "no room on rb: an instance asks gpu=1, but only gpu=0 is free (of gpu=2)" in client.policy_status()["refused"][-1]
    wait_for(lambda: len(instances(client, B, "Gpu")) == 2, 30, "two instances on B")

    # a forged (or raced) scale past the room: node A refuses it and says why, the rest of the batch applies
    ctl.round(lambda v, act: (act.ops.append(Scale(A, "Gpu", 2, [])), act.set_priority("s", 1)))
    ctl_a = node_status(client, A)["control"]
    assert ctl_a["refused"] == {"no_room": 1}, ctl_a
    assert list(ctl_a["refusals"].values()) == [
        f"no_room: scale Gpu on {A} to 2: no room: an instance asks gpu=1, but only gpu=0 is free (of gpu=1)"]
    assert len(instances(client, A, "Gpu")) == 1

    # nalar status shows used and free, in text and JSON
    st = ["status", "--nats", nats_url, "--namespace", namespace]
    out = subprocess.run([*NALAR, *st], capture_output=True, text=True, timeout=60, env=node_env()).stdout
    assert out.count("  resources: ") == 2 and "gpu 2 of 2 used, 0 free" in out and "gpu 1 of 1 used, 0 free" in out, out
    doc = orjson.loads(subprocess.run([*NALAR, *st, "--json"], capture_output=True, timeout=60, env=node_env()).stdout)
    assert {n["node"]: n["resources"]["free"]["gpu"] for n in doc["nodes"]} == {A: 0, B: 0}

    # a kill frees the room: at once for the policy, and on the node
    said.clear()
    ctl.round(lambda v, act: said.extend([act.kill(f"Gpu-{B}-0"), act.can_provision("Gpu", B)]))
    assert said == [True, True]
    wait_for(lambda: node_status(client, B)["resources"]["used"] == {"gpu": 1}, 30, "B's GPU released")
    said.clear()
    ctl.round(lambda v, act: said.append(act.provision("Gpu", B)))
    assert said == [True]
    wait_for(lambda: [i["id"] for i in instances(client, B, "Gpu")] == [f"Gpu-{B}-1", f"Gpu-{B}-2"], 30,
             "the new instance on the freed GPU")
    assert {client.stub("Gpu").where().result(30) for _ in range(20)} <= {f"Gpu-{A}-0", f"Gpu-{B}-1", f"Gpu-{B}-2"}


# -- reassign -------------------------------------------------------------------------------------------
def _metrics(node: str, gpu_total: int, actors: dict[str, Any]) -> dict[str, Any]:
    used = sum(a["resources"].get("gpu", 0) * len(a["instances"]) for a in actors.values())
    return {"node": node, "in_flight": 0, "actors": actors, "resources": {"total": {"gpu": gpu_total},
                                                                          "used": {"gpu": used}}}


def _actor(node: str, name: str, gpu: int, queued: int = 0) -> dict[str, Any]:
    return {"kind": "tool", "min": 1, "max": None, "queued": queued, "running": 0, "wait_ms": 1000.0 if queued else 0,
            "resources": {"gpu": gpu}, "instances": [[f"{name}-{node}-0", 0, 0, 1, False]]}


def test_reassign_moves_an_instance_only_to_a_node_where_it_fits() -> None:
    # Hot (2 GPUs an instance) is queued; Cold (1 GPU) is idle on both nodes. Killing Cold on n1 frees
    # its 1 GPU of 1 there (Hot does not fit); on n2 (4 GPUs, 3 held) it leaves 2 free: Hot fits.
    metrics = {"n1": _metrics("n1", 1, {"Cold": _actor("n1", "Cold", 1),
                                        "Hot": _actor("n1", "Hot", 2, queued=5) | {"instances": []}}),
               "n2": _metrics("n2", 4, {"Cold": _actor("n2", "Cold", 1), "Hot": _actor("n2", "Hot", 2, queued=5)})}
    view = View(metrics, DecisionTable(), 100)
    act = Actions(view)
    assert act.room("n1") == {"gpu": 0} and act.room("n2") == {"gpu": 1}
    assert not act.can_provision("Hot", "n1", freeing="Cold-n1-0")
    assert act.can_provision("Hot", "n2", freeing="Cold-n2-0") and not act.can_provision("Hot", "n2")
    Reassign().decide(view, act)
    assert [op.to_wire() for op in act.ops] == [["scale", "n2", "Cold", 0, ["Cold-n2-0"]], ["scale", "n2", "Hot", 2, []]]
    assert act.room("n2") == {"gpu": 0}

    # Hot needing 3 GPUs fits on neither node once Cold goes: nothing moves
    for m in metrics.values():
        m["actors"]["Hot"]["resources"] = {"gpu": 3}
    view = View(metrics, DecisionTable(), 100)
    act = Actions(view)
    Reassign().decide(view, act)
    assert act.ops == [] and act.refused == []


def test_nalar_up_takes_resources_too(tmp_path, monkeypatch):
    from conftest import free_port

    args = ["up", "sample_resources:Gpu=2", "--resources", "gpu=1", "--insecure", "--port", str(free_port()),
            "--data-dir", str(tmp_path / "up"), "--gateway-port", "0"]
    r = subprocess.run([*NALAR, *args], capture_output=True, text=True, timeout=60, env=node_env())
    assert r.returncode == 2, r
    assert "nalar: Gpu: instance 2 of 2 does not fit on node" in r.stderr and "(of gpu=1)" in r.stderr, r.stderr
