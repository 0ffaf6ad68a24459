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
