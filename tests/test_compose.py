"""docker-compose.yml: valid for docker-compose, and its nalar services' commands really serve the demo."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import NodeProc, node_env, wait_for

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SERVICES = {"nats", "jaeger", "policy", "node1", "node2"}
COMPOSE_NATS = "nats://nats:4222"


def _load() -> dict[str, Any]:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def _env(service: dict[str, Any]) -> dict[str, str]:
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) if "=" in item else (item, "") for item in e)
    return {str(k): "" if v is None else str(v) for k, v in e.items()}


def _published(service: dict[str, Any]) -> set[int]:
    out: set[int] = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add(int(p["published"]))
        else:  # "HOST:CONTAINER", "IP:HOST:CONTAINER" or "CONTAINER", maybe with "/proto"
            parts = str(p).split("/")[0].split(":")
            out.add(int(parts[-2] if len(parts) > 1 else parts[-1]))
    return out


def test_docker_compose_config_accepts_the_file() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (.ci/run apt-get installs it); nothing validates the file")
    r = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load(r.stdout)
    assert SERVICES <= set(config["services"]), r.stdout


def test_the_vllm_service_needs_the_gpu_profile() -> None:
    vllm = _load()["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"]  # plain `docker-compose up` leaves it out
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert 8000 in _published(vllm) and "healthcheck" in vllm
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"]
    assert "--model" in vllm["command"] and "build" not in vllm  # not one of the nalar services run below
    exe = shutil.which("docker-compose")
    if exe is not None:
        r = subprocess.run([exe, "-f", str(COMPOSE), "--profile", "gpu", "config"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "vllm" in yaml.safe_load(r.stdout)["services"]


def test_compose_services_and_node_commands_serve_the_demo(nats_url: str, namespace: str, client: Any) -> None:
    services = _load()["services"]
    assert SERVICES <= set(services)

    jaeger = services["jaeger"]
    assert _env(jaeger).get("COLLECTOR_OTLP_ENABLED", "").lower() == "true"
    assert {4318, 16686} <= _published(jaeger)
    assert "-js" in services["nats"]["command"]

    built = {name: s for name, s in services.items() if "build" in s}
    assert {"node1", "node2", "policy"} <= set(built)
    procs: list[NodeProc] = []
    try:
        for name, s in built.items():
            command = list(s["command"])
            assert command[0] == "nalar" and command[1] in ("node", "policy"), command
            args = [nats_url if a == COMPOSE_NATS else a for a in command[2:]] + ["--namespace", namespace]
            # The service's own environment minus tracing: no Jaeger runs here.
            extra = {k: v for k, v in _env(s).items() if not k.startswith("OTEL_")}
            env = node_env(extra)
            for k in [k for k in env if k.startswith("OTEL_")]:
                del env[k]
            p = NodeProc(args, env, command[1], " ready on " if command[1] == "node" else "policy actor ready")
            procs.append(p)
            p.wait_ready()

        result = client.stub("Analyst").analyze("the quick brown fox the").result(30)
        assert result["stats"]["words"] == 5
        assert result["keywords"][0] == "the"

        names = {args[args.index("--name") + 1] for args in (s["command"] for s in built.values()) if "--name" in args}
        assert names == {"node1", "node2"}
        wait_for(lambda: names <= {n["node"] for n in client.status()}, what=f"status from {names}")
        # the policy service runs rounds over both nodes and says which policies it runs
        # (an early round may gather only the nodes whose heartbeat the policy actor has heard yet)
        st = wait_for(lambda: (p := client.policy_status()) and p["rounds"] >= 2
                      and (r := p["last_round"] or {}).get("nodes") == 2 and r.get("applied_by") == 2 and p,
                      what="a policy round over both nodes, applied by both")
        assert st["policies"] == ["balance", "head-of-line", "affinity"]
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0] * len(procs), "".join(o for p in procs for o in p.output)
