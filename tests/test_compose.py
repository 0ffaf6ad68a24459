"""docker-compose.yml: valid for docker-compose, and its nalar services' commands really serve the demo."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import nalar
from conftest import NodeProc, node_env, wait_for
from nalar.bus import auth

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


def _interpolate(value: str, dotenv: dict[str, str]) -> str:
    """docker-compose's ``${VAR:-default}``, from the .env file ``nalar auth env`` writes."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: dotenv.get(m.group(1)) or (m.group(2) or ""), value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_compose_services_and_node_commands_serve_the_demo(tmp_path: Path, namespace: str) -> None:
    """Every service nalar builds, run here as compose would run it, with the credentials of `nalar auth env`."""
    services = _load()["services"]
    assert SERVICES <= set(services)

    jaeger = services["jaeger"]
    assert _env(jaeger).get("COLLECTOR_OTLP_ENABLED", "").lower() == "true"
    assert _published(jaeger) == {16686} and all(str(p).startswith("127.0.0.1:") for p in jaeger["ports"])
    assert _published(services["nats"]) == {4222}  # the only port other hosts see (no monitor, no OTLP)
    assert all(str(p).startswith("127.0.0.1:") for p in services["vllm"]["ports"])

    creds = auth.Credentials(tmp_path / "creds", namespace)
    creds.init()
    dotenv = dict(line.split("=", 1) for line in creds.env_file().splitlines() if line and not line.startswith("#"))
    built = {name: s for name, s in services.items() if "build" in s and not s.get("profiles")}
    assert {"nats", "node1", "node2", "policy"} <= set(built)
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    procs: list[NodeProc] = []

    def run(name: str, s: dict[str, Any], marker: str) -> NodeProc:
        command = list(s["command"])
        assert command[0] == "nalar", command
        args = [url if a == COMPOSE_NATS else a for a in command[2:]]
        if command[1] == "nats":
            args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
            args[args.index("--data-dir") + 1] = str(tmp_path / "nats-data")
        else:
            args += ["--namespace", namespace]
        # the service's own environment (compose-interpolated) minus tracing: no Jaeger runs here
        extra = {k: _interpolate(v, dotenv) for k, v in _env(s).items() if not k.startswith("OTEL_")}
        extra["NALAR_HOME"] = str(tmp_path / f"home-{name}")
        env = node_env(extra)
        for k in [k for k in env if k.startswith("OTEL_") or k in ("NALAR_NATS_NKEY", "NALAR_NATS_URL")]:
            del env[k]
        p = NodeProc(args, env, command[1], marker)
        procs.append(p)
        p.wait_ready()
        return p

    def connect(role: str) -> Any:
        os.environ["NALAR_NATS_NKEY_SEED"] = dotenv[f"NALAR_{role.upper()}_SEED"]
        try:
            return nalar.connect(url, namespace, role=role)
        finally:
            del os.environ["NALAR_NATS_NKEY_SEED"]

    try:
        run("nats", built["nats"], "nalar nats ready on")
        with pytest.raises(nalar.BusError, match="requires credentials"):
            nalar.connect(url, namespace)
        for name in ("node1", "node2"):
            run(name, built[name], " ready on ")
        run("policy", built["policy"], "policy actor ready")

        with connect("client") as client:
            result = client.stub("Analyst").analyze("the quick brown fox the").result(30)
        assert result["stats"]["words"] == 5
        assert result["keywords"][0] == "the"

        names = {args[args.index("--name") + 1] for args in (s["command"] for s in built.values()) if "--name" in args}
        assert names == {"node1", "node2"}
        with connect("operator") as op:  # what `docker-compose run --rm cli status` does
            wait_for(lambda: names <= {n["node"] for n in op.status()}, what=f"status from {names}")
            # the policy service runs rounds over both nodes and says which policies it runs
            # (an early round may gather only the nodes whose heartbeat the policy actor has heard yet)
            st = wait_for(lambda: (p := op.policy_status()) and p["rounds"] >= 2
                          and (r := p["last_round"] or {}).get("nodes") == 2 and r.get("applied_by") == 2 and p,
                          what="a policy round over both nodes, applied by both")
        assert st["policies"] == ["balance", "head-of-line", "affinity"]
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0] * len(procs), "".join(o for p in procs for o in p.output)


def test_the_cli_service_is_the_operator() -> None:
    cli = _load()["services"]["cli"]
    assert cli["profiles"] == ["tools"] and cli["entrypoint"] == ["nalar"]
    assert cli["environment"]["NALAR_NATS_NKEY_SEED"] == "${NALAR_OPERATOR_SEED:-}"
    seeds = {name: _env(s).get("NALAR_NATS_NKEY_SEED") for name, s in _load()["services"].items() if "build" in s}
    assert seeds == {"nats": None, "policy": "${NALAR_POLICY_SEED:-}", "node1": "${NALAR_NODE_SEED:-}",
                     "node2": "${NALAR_NODE_SEED:-}", "cli": "${NALAR_OPERATOR_SEED:-}"}
