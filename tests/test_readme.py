"""Every example in the README runs as written.

Each ```python block is preceded by ``<!-- readme-example: FILE -->`` (or ``readme-policy``), the file it
is saved as; every such file has a test here that runs it (``test_every_python_snippet_is_run`` fails
on a block no test runs). Each snippet carries its own imports: it is run as its own file. The ```sh
blocks are split into commands: the ones right after a snippet are run against a real node where they
can be, and every ``nalar`` command in the README must be one the CLI has, with options its ``--help``
lists.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import nalar
from conftest import node_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
EXPECTED_ANSWER = "3 documents, the first: what is nalar?: result 0"
#: The files the README's python snippets are saved as, each run by a test below.
RUN_HERE = {"myagents.py", "client.py", "local_mode.py", "notebook.py", "writer.py", "mypolicy.py",
            "openai_client.py", "stream_writer.py", "embedder.py"}
#: What a README shell block may run; anything else is a new kind of snippet this file must learn.
KNOWN_PROGRAMS = {"nalar", "python", "python3", "pip", ".", "docker-compose", "umask", "curl"}
_FENCE = re.compile(r"(?:<!-- readme-(?:example|policy): (\S+) -->\s*)?^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(lang: str) -> list[tuple[str | None, str, int]]:
    """(file it is saved as, code, line) of every fenced block of ``lang``."""
    text = README.read_text()
    return [(m.group(1), m.group(3), text.count("\n", 0, m.start(2)) + 1)
            for m in _FENCE.finditer(text) if m.group(2) == lang]


def _snippet(name: str) -> str:
    (code,) = [c for n, c, _ in _blocks("python") if n == name]
    return code


def _write(tmp_path: Path, *names: str) -> None:
    for n in names:
        (tmp_path / n).write_text(_snippet(n))


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block as words: comments, ``&&``, ``;``, ``|``, subshells and
    redirections (with their targets) split off."""
    out: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        cmd: list[str] = []
        words = iter(lex)
        for w in words:
            if w in ("&&", "||", ";", "|", "(", ")", "&"):
                out += [cmd] if cmd else []
                cmd = []
            elif w in (">", ">>", "<"):
                next(words, None)
            else:
                cmd.append(w)
        out += [cmd] if cmd else []
    return out


def _sh_after(name: str) -> list[list[str]]:
    """The commands of the first shell block after snippet ``name``."""
    text = README.read_text()
    start = text.index(f"<!-- readme-example: {name} -->")
    m = re.compile(r"^```sh\n(.*?)^```", re.S | re.M).search(text, start)
    assert m, f"no shell block after {name}"
    return _commands(m.group(1))


def _env_and_words(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    """``VAR=value`` assignments before a command, and its words."""
    env: dict[str, str] = {}
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
        k, _, v = cmd[0].partition("=")
        env[k] = v
        cmd = cmd[1:]
    return env, cmd


def _nalar() -> list[str]:
    """The ``nalar`` script installed beside this Python (what a user types), else its module."""
    exe = shutil.which("nalar", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "nalar.cli.main"]


def _run(words: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert words[0] == "nalar", words
    r = subprocess.run([*_nalar(), *words[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{shlex.join(words)} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


def _deployment_env(nats_url: str, namespace: str) -> dict[str, str]:
    """What a shell next to `nalar up` has, for this test's server: the README's commands find it so."""
    return node_env({"NALAR_NATS_URL": nats_url, "NALAR_NAMESPACE": namespace})


# -- every snippet is covered --------------------------------------------------------------------------
def test_every_python_snippet_is_run() -> None:
    blocks = _blocks("python")
    unnamed = [line for n, _, line in blocks if n is None]
    assert not unnamed, f"README python blocks at lines {unnamed} have no <!-- readme-example: FILE --> marker"
    names = [n for n, _, _ in blocks]
    assert len(names) == len(set(names)), names
    assert set(names) == RUN_HERE, f"snippets no test runs: {set(names) - RUN_HERE}; gone: {RUN_HERE - set(names)}"
    text = README.read_text()
    langs = {m.group(1) for m in re.finditer(r"^```(\w*)\n", text, re.M)} - {""}  # "" closes, or is a plain listing
    # promql: the Metrics section's query, which tests/test_metrics.py runs against a real Prometheus
    assert langs <= {"python", "sh", "promql"}, f"a README block in {langs - {'python', 'sh', 'promql'}}: teach tests/test_readme.py"


def test_shell_snippets_are_commands_nalar_has() -> None:
    """Every ``nalar`` command in a shell block is accepted up to ``--help`` (its subcommands exist, the
    values before it parse) and every option it uses is in that help; ``pip install`` names real extras."""
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    nalar_cmds: list[list[str]] = []
    for _, block, line in _blocks("sh"):
        for cmd in _commands(block):
            _, words = _env_and_words(cmd)
            if "nalar" in words:
                nalar_cmds.append(words[words.index("nalar"):])
            assert words[0] in KNOWN_PROGRAMS, f"README line ~{line}: {shlex.join(cmd)}"
            if words[:2] == ["pip", "install"]:
                for w in words[2:]:
                    if m := re.fullmatch(r"\.\[([\w,]+)\]", w):
                        assert set(m.group(1).split(",")) <= extras, (w, extras)
    assert len(nalar_cmds) >= 10, nalar_cmds

    def check(words: list[str]) -> str | None:
        r = subprocess.run([*_nalar(), *words[1:], "--help"], capture_output=True, text=True, timeout=60,
                           env=node_env(), cwd=REPO)
        if r.returncode != 0 or "usage" not in r.stdout.lower():
            return f"{shlex.join(words)} --help: exit {r.returncode}\n{r.stdout}{r.stderr}"
        missing = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in r.stdout]
        return f"{shlex.join(words)}: {missing} not in its --help" if missing else None

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        problems = [p for p in ex.map(check, nalar_cmds) if p]
    assert not problems, "\n\n".join(problems)


def test_nalar_models_is_a_module(tmp_path: Path) -> None:
    """`import nalar.models` and `from nalar.models import LLM`, in a fresh interpreter: one copy of
    each module, the same objects as nalar.actors.models."""
    code = ("import nalar.models, nalar.models.simulated as s\n"
            "from nalar.models import LLM\n"
            "import nalar, nalar.actors.models as real, nalar.actors.models.simulated as rs\n"
            "assert nalar.models is real and LLM is real.LLM and s is rs, (nalar.models, s)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=node_env())
    assert r.stdout.strip() == "ok", r.stdout + r.stderr


# -- An agent: the classes, a node, the CLI, a client, local mode -------------------------------------------
def test_the_agent_runs_in_local_mode_as_written(tmp_path: Path) -> None:
    _write(tmp_path, "myagents.py", "local_mode.py")
    r = subprocess.run([sys.executable, "local_mode.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=node_env())
    assert r.returncode == 0 and r.stdout.strip() == EXPECTED_ANSWER, r.stdout + r.stderr


def test_the_agent_served_by_a_node_answers_the_cli_and_a_client(tmp_path, start_node, nats_url, namespace,
                                                                 monkeypatch) -> None:
    _write(tmp_path, "myagents.py", "client.py")
    node_cmd, call_cmd = _sh_after("myagents.py")
    assert node_cmd[:2] == ["nalar", "node"] and call_cmd[:2] == ["nalar", "call"], (node_cmd, call_cmd)
    monkeypatch.chdir(tmp_path)  # `nalar node myagents:...` imports from the working directory
    start_node(*node_cmd[2:])
    env = _deployment_env(nats_url, namespace)
    assert json.loads(_run(call_cmd, env, tmp_path).stdout) == EXPECTED_ANSWER
    r = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == EXPECTED_ANSWER, r.stdout + r.stderr


def test_the_batchable_embedder_answers_each_caller(tmp_path, start_node, nats_url, namespace, monkeypatch) -> None:
    _write(tmp_path, "embedder.py")
    node_cmd, call_cmd = _sh_after("embedder.py")
    assert node_cmd[:2] == ["nalar", "node"] and call_cmd[:2] == ["nalar", "call"], (node_cmd, call_cmd)
    monkeypatch.chdir(tmp_path)
    start_node(*node_cmd[2:])
    assert json.loads(_run(call_cmd, _deployment_env(nats_url, namespace), tmp_path).stdout) == [8.0, 1.0]


# -- Session state ---------------------------------------------------------------------------------------
def test_the_notebook_keeps_its_notes_per_session(tmp_path, start_node, nats_url, namespace, monkeypatch) -> None:
    _write(tmp_path, "notebook.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import notebook  # type: ignore[import-not-found]

        with nalar.local(notebook.Notebook) as app:
            me = app.stub(notebook.Notebook).options(session="me")
            assert [me.add("buy milk").result(30), me.add("call mum").result(30)] == [1, 2]
            assert app.stub(notebook.Notebook).options(session="you").add("x").result(30) == 1
    finally:
        sys.modules.pop("notebook", None)

    start_node("notebook:Notebook")
    env = _deployment_env(nats_url, namespace)
    cmds = {tuple(c[:3]): c for c in _sh_after("notebook.py")}
    assert _run(cmds[("nalar", "call", "Notebook.add")], env, tmp_path).stdout.strip() == "1"
    assert "buy milk" in _run(cmds[("nalar", "state", "show")], env, tmp_path).stdout
    assert "add" in _run(cmds[("nalar", "state", "log")], env, tmp_path).stdout
    assert ("nalar", "state", "migrate") in cmds  # NODE_A/NODE_B are placeholders: checked against --help only


# -- Models ----------------------------------------------------------------------------------------------
def test_the_model_example_starts_and_answers_on_the_simulated_engine(tmp_path, start_node, nats_url, namespace,
                                                                      client, monkeypatch) -> None:
    """``Writer`` names vLLM with ``max_model_len``; under ``NALAR_LLM=sim`` it runs on the simulation,
    which keeps that limit as vLLM would."""
    _write(tmp_path, "writer.py")
    node_cmd, call_cmd = _sh_after("writer.py")
    env_vars, node_words = _env_and_words(node_cmd)
    assert env_vars == {"NALAR_LLM": "sim"} and node_words[:2] == ["nalar", "node"], node_cmd
    monkeypatch.chdir(tmp_path)
    node = start_node(*node_words[2:], env=env_vars)
    out = json.loads(_run(call_cmd, _deployment_env(nats_url, namespace), tmp_path).stdout)
    assert out["engine"] == "simulated:llama3-8b-a100" and out["completion_tokens"] >= 1 and out["text"], out
    writer = client.stub("Writer", timeout=60)
    with pytest.raises(nalar.RemoteError) as ei:  # the class's max_model_len=8192, kept by the simulation
        writer.generate("hello", max_tokens=8192).result(60)
    assert ei.value.type == "ValueError" and "max_model_len" in ei.value.message, ei.value
    assert not [line for line in node.output if "ignores engine_args" in line], node.output


# -- HTTP gateway ----------------------------------------------------------------------------------------
def test_the_gateway_examples_run_against_a_gateway(tmp_path, start_node, nats_url, namespace) -> None:
    """`nalar gateway` as the README starts it (on a free port), its curl call, and the openai client
    snippet against the Writer of the Models section on the simulated engine."""
    from conftest import NodeProc, free_port

    _write(tmp_path, "writer.py", "openai_client.py", "stream_writer.py")
    text = README.read_text()
    start = text.index("## HTTP gateway")
    block = re.compile(r"^```sh\n(.*?)^```", re.S | re.M).search(text, start)
    assert block
    gateway_cmd, curl_cmd = _commands(block.group(1))
    assert gateway_cmd[:2] == ["nalar", "gateway"] and curl_cmd[0] == "curl", (gateway_cmd, curl_cmd)
    start_node("nalar.workloads.demo:Notebook", "writer:Writer", env={"NALAR_LLM": "sim",
                                                                       "PYTHONPATH": str(tmp_path)})
    port = str(free_port())
    args = [port if w == "8000" else w for w in gateway_cmd[2:]]
    gw = NodeProc(args, _deployment_env(nats_url, namespace), cmd="gateway", marker="listening on")
    try:
        gw.wait_ready()
        url = [w.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for w in curl_cmd]
        r = subprocess.run(url, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and json.loads(r.stdout) == {"result": 1}, (r.stdout, r.stderr)
        (run_cmd,) = _sh_after("openai_client.py")
        env_vars, words = _env_and_words(run_cmd)
        env_vars["OPENAI_BASE_URL"] = env_vars["OPENAI_BASE_URL"].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        r = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=node_env(env_vars), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 2 and all(line.strip() for line in lines), r.stdout
        (run_cmd,) = _sh_after("stream_writer.py")  # a streaming call, straight from a client
        _, words = _env_and_words(run_cmd)
        r = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=_deployment_env(nats_url, namespace),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        *shown, count = r.stdout.strip().splitlines()
        assert shown and "tokens)" in shown[-1] and count.endswith(" items") and int(count.split()[0]) >= 2, r.stdout
    finally:
        gw.stop()


# -- Writing a policy ------------------------------------------------------------------------------------
def test_readme_policy_decides_as_described(tmp_path, monkeypatch):
    """The README's policy, loaded as `nalar policy --policies mypolicy:SpillOver` would, over a round's
    metrics: a session waiting behind a backlog moves to the idle instance; the backlog gets an instance."""
    from nalar.actors.control import DecisionTable, Migrate, Scale
    from nalar.policy import Actions, View, load_policies

    code = _snippet("mypolicy.py")
    (tmp_path / "mypolicy.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        [policy] = load_policies("mypolicy:SpillOver")
        assert 15 <= len(code.strip().splitlines()) <= 20  # "about 15 lines"

        def node(name: str, running: int, queued: int, waiting: list) -> dict:
            return {"node": name, "in_flight": running + queued, "actors": {"A": {
                "kind": "agent", "stateful": True, "min": 1, "max": 3, "queued": queued, "running": running,
                "instances": [[f"A-{name}-0", running, 0, 1, False]], "waiting": waiting}}}

        metrics = {"n1": node("n1", 1, 150, [["s1", None, 900.0, 0, 0, 0], ["s2", None, 20.0, 0, 0, 0]]),
                   "n2": node("n2", 0, 0, [])}
        act = Actions(View(metrics, DecisionTable(), 1))
        policy.decide(act.view, act)
        ops = act.batch()
        moves = [(op.session, op.actor, op.src, op.dst) for op in ops if isinstance(op, Migrate)]
        assert moves == [("s1", "A", "A-n1-0", "A-n2-0")]  # s2 has not waited 500 ms
        assert Scale("n1", "A", 2, []) in ops
    finally:
        sys.modules.pop("mypolicy", None)
