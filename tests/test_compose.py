"""docker-compose.yml: valid for docker-compose, and its nalar services' commands really serve the demo."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from prometheus_client.parser import text_string_to_metric_families

import nalar
from conftest import NodeProc, free_port, node_env, wait_for
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


#: The Compose Specification's JSON schema as docker-compose 1.29.2 ships it (compose/config/compose_spec.json,
#: Apache-2.0), the one `docker-compose config` validates against.
COMPOSE_SPEC = Path(__file__).resolve().parent / "compose_spec.json"
#: docker-compose's own format checks (compose/config/validation.py), as patterns.
_PORT = r"((\d{1,3}\.){3}\d{1,3}:)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?"
_FORMATS = {"ports": _PORT, "expose": r"\d+(-\d+)?(/[a-zA-Z]+)?", "duration": r"(\d+(\.\d+)?(us|ms|s|m|h))+"}


def _spec_errors(config: dict[str, Any]) -> list[str]:
    """What `docker-compose config` checks, without the binary: the file, interpolated, against the
    Compose Specification's schema with docker-compose's format checks (Draft 4, as it does), then the
    references it resolves (services depended on, named volumes and networks, build contexts)."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the vllm extra of the README's "
                                     "test command")
    checker = jsonschema.FormatChecker()
    for name, pattern in _FORMATS.items():
        checker.checks(name)(lambda v, p=pattern: not isinstance(v, str) or re.fullmatch(p, v) is not None)
    schema = json.loads(COMPOSE_SPEC.read_text())
    validator = jsonschema.Draft4Validator(schema, format_checker=checker)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(config)]
    services = config.get("services") or {}
    declared = {kind: set(config.get(kind) or {}) for kind in ("volumes", "networks")}
    for name, s in services.items():
        deps = s.get("depends_on") or []
        errors += [f"{name}: depends on undefined service {d!r}" for d in deps if d not in services]
        for v in s.get("volumes") or []:
            src = v.get("source") if isinstance(v, dict) else (str(v).split(":")[0] if ":" in str(v) else None)
            if src and not src.startswith((".", "/", "~")) and src not in declared["volumes"]:
                errors.append(f"{name}: named volume {src!r} is not declared under volumes")
        nets = [n for n in s.get("networks") or [] if n not in declared["networks"] | {"default"}]
        errors += [f"{name}: network {n!r} is not declared" for n in nets]
        build = s.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (context / dockerfile).is_file():
                errors.append(f"{name}: build context {context} has no {dockerfile}")
    return errors


def _interpolated(text: str) -> dict[str, Any]:
    """The file as docker-compose reads it with nothing set: every ``${VAR:-default}`` at its default."""
    return yaml.safe_load(re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", text))


def test_docker_compose_config_accepts_the_file() -> None:
    """Validated here whether or not docker-compose is installed (the README's test command does not
    install it); where it is, `docker-compose config` must agree."""
    config = _interpolated(COMPOSE.read_text())
    assert not _spec_errors(config), "\n".join(_spec_errors(config))
    assert SERVICES <= set(config["services"])
    exe = shutil.which("docker-compose")
    if exe is not None:
        r = subprocess.run([exe, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert SERVICES <= set(yaml.safe_load(r.stdout)["services"]), r.stdout


def test_the_schema_check_finds_what_docker_compose_refuses() -> None:
    """The check without the binary is not vacuous: each mistake below is one `docker-compose config` refuses."""
    good = _interpolated(COMPOSE.read_text())
    assert not _spec_errors(good)

    def broken(edit: Any) -> list[str]:
        c = copy.deepcopy(good)
        edit(c)
        return _spec_errors(c)

    assert broken(lambda c: c["services"]["node1"].update(comand=["x"]))  # a typo of a key
    assert broken(lambda c: c["services"]["nats"].update(ports=["42x2:4222"]))
    assert broken(lambda c: c["services"]["policy"].update(depends_on=["natz"]))
    assert broken(lambda c: c["services"]["node1"].update(volumes=["nodeX-data:/data"]))
    assert broken(lambda c: c["services"]["vllm"]["healthcheck"].update(interval="10 seconds"))
    assert broken(lambda c: c["services"]["node1"].update(restart=["always"]))
    assert broken(lambda c: c.update(servics={}))


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
    assert {"nats", "node1", "node2", "policy", "gateway"} <= set(built)
    port, http_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{port}"
    procs: list[NodeProc] = []
    metrics: dict[str, str] = {}  # service -> where its /metrics is served here

    def run(name: str, s: dict[str, Any], marker: str) -> NodeProc:
        command = list(s["command"])
        assert command[0] == "nalar", command
        args = [url if a == COMPOSE_NATS else a for a in command[2:]]
        if command[1] == "nats":
            args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
            args[args.index("--data-dir") + 1] = str(tmp_path / "nats-data")
        elif command[1] == "gateway":  # loopback, on a free port
            args[args.index("--host") + 1] = "127.0.0.1"
            args[args.index("--port") + 1] = str(http_port)
            args += ["--namespace", namespace]
        else:
            args += ["--namespace", namespace]
        # the service's own environment (compose-interpolated) minus tracing: no Jaeger runs here
        extra = {k: _interpolate(v, dotenv) for k, v in _env(s).items() if not k.startswith("OTEL_")}
        extra["NALAR_HOME"] = str(tmp_path / f"home-{name}")
        if "NALAR_METRICS_PORT" in extra:  # its /metrics on loopback, on a free port
            extra["NALAR_METRICS_PORT"], extra["NALAR_METRICS_ADDR"] = str(free_port()), "127.0.0.1"
            metrics[name] = f"127.0.0.1:{extra['NALAR_METRICS_PORT']}"
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
        run("gateway", built["gateway"], "listening on")  # with the client's credential
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/actors/Analyst/analyze", json=["the quick brown fox the"],
                       timeout=30)
        assert r.status_code == 200 and r.json()["result"]["stats"]["words"] == 5, r.text

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
        # the metrics profile's targets: every node and the policy serve /metrics, and so does the gateway
        assert set(metrics) == {"node1", "node2", "policy"}, metrics
        for name, target in {**metrics, "gateway": f"127.0.0.1:{http_port}"}.items():
            text = httpx.get(f"http://{target}/metrics", timeout=10).raise_for_status().text
            families = {f.name for f in text_string_to_metric_families(text)}
            want = {"policy": "nalar_policy_rounds", "gateway": "nalar_gateway_http_requests"}.get(name, "nalar_calls")
            assert want in families, (name, sorted(families))
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0] * len(procs), "".join(o for p in procs for o in p.output)


def test_the_metrics_profile_scrapes_every_nalar_service() -> None:
    """Prometheus (profile metrics) scrapes exactly the services that serve /metrics, on their ports."""
    services = _load()["services"]
    prom = services["prometheus"]
    assert prom["profiles"] == ["metrics"] and prom["image"].startswith("prom/prometheus")
    assert all(str(p).startswith("127.0.0.1:") for p in prom["ports"])  # its UI has no login
    mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((REPO / mount.split(":")[0]).read_text())
    scraped = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    serving = {f"{name}:{_env(s)['NALAR_METRICS_PORT']}" for name, s in services.items()
               if "NALAR_METRICS_PORT" in _env(s)}
    assert all(_env(services[t.split(":")[0]]).get("NALAR_METRICS_ADDR") == "0.0.0.0" for t in serving)
    gw = services["gateway"]["command"]
    serving.add(f"gateway:{gw[gw.index('--port') + 1]}")
    assert scraped == serving, (scraped, serving)
    assert set(prom["depends_on"]) == {t.split(":")[0] for t in serving}


def test_the_cli_service_is_the_operator() -> None:
    cli = _load()["services"]["cli"]
    assert cli["profiles"] == ["tools"] and cli["entrypoint"] == ["nalar"]
    assert cli["environment"]["NALAR_NATS_NKEY_SEED"] == "${NALAR_OPERATOR_SEED:-}"
    seeds = {name: _env(s).get("NALAR_NATS_NKEY_SEED") for name, s in _load()["services"].items() if "build" in s}
    assert seeds == {"nats": None, "policy": "${NALAR_POLICY_SEED:-}", "node1": "${NALAR_NODE_SEED:-}",
                     "node2": "${NALAR_NODE_SEED:-}", "cli": "${NALAR_OPERATOR_SEED:-}",
                     "gateway": "${NALAR_CLIENT_SEED:-}"}
