"""The README's example agent runs as written (in local mode and in a real node process)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nalar

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(tmp_path: Path) -> Path:
    text = README.read_text()
    m = re.search(r"<!-- readme-example: (\S+) -->\s*```python\n(.*?)```", text, re.S)
    assert m, "the README lost its example block"
    path = tmp_path / m.group(1)
    path.write_text(m.group(2))
    return path


def test_readme_example_runs_in_local_mode(tmp_path):
    path = _example(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import myagents  # type: ignore[import-not-found]

        with nalar.local(myagents.Researcher, myagents.Search, myagents.Summarize) as app:
            out = app.stub(myagents.Researcher).answer("what is nalar?").result(30)
        assert out == "3 documents, the first: what is nalar?: result 0"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("myagents", None)
    assert path.exists()


def test_readme_example_served_by_a_node(tmp_path, start_node, client, monkeypatch):
    _example(tmp_path)
    monkeypatch.chdir(tmp_path)  # `nalar node myagents:...` imports from the working directory
    start_node("myagents:Researcher=2", "myagents:Search", "myagents:Summarize")
    assert client.stub("Researcher").answer("q").result(30) == "3 documents, the first: q: result 0"


def test_readme_policy_decides_as_described(tmp_path, monkeypatch):
    """The README's policy, loaded as `nalar policy --policies mypolicy:SpillOver` would, over a round's
    metrics: a session waiting behind a backlog moves to the idle instance; the backlog gets an instance."""
    from nalar.actors.control import DecisionTable, Migrate, Scale
    from nalar.policy import Actions, View, load_policies

    m = re.search(r"<!-- readme-policy: (\S+) -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, "the README lost its policy example"
    (tmp_path / m.group(1)).write_text(m.group(2))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        [policy] = load_policies("mypolicy:SpillOver")
        assert 15 <= len(m.group(2).strip().splitlines()) <= 20  # "about 15 lines"

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
