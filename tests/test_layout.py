"""The package's structure, read from the AST (no import runs, no third-party tool), so it cannot regress.

- no import cycle between files: every ``import`` counts (module level, inside functions, under
  ``if TYPE_CHECKING:``), relative or absolute ``nalar.`` alike;
- folders import one way: ``bus`` < ``state`` < ``actors`` < ``policy`` < ``cli``, ``workloads``;
- no file of the executor package (``actors/node/``) is over 400 lines;
- no ``TYPE_CHECKING`` block declares methods (one class re-declaring another's privates to type-check);
- every internal import names a file, and every package directory is installed by ``pyproject.toml``.

``python tests/test_layout.py`` prints the graph summary and exits non-zero on any failure; pytest runs
the same checks. The checker takes a root and a package name, so the tests below also run it on
synthetic packages under ``tmp_path``.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from collections import deque
from pathlib import Path

try:
    import pytest
except ImportError:  # the script needs only the standard library
    pytest = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "nalar"
#: Directories under the root that hold no package source.
SKIP_DIRS = {"tests", "build", "dist", "__pycache__"}
#: Top-level folders, bottom first; a folder may import only folders of a lower rank.
LAYERS = {"bus": 0, "state": 1, "actors": 2, "policy": 3, "cli": 4, "workloads": 4}
#: Imports between folders of the same rank that are allowed (`nalar bench` and `nalar up` run workloads).
SAME_RANK_ALLOWED = {("cli", "workloads")}
EXECUTOR_DIR = "actors/node"
EXECUTOR_MAX_LINES = 400


class Graph:
    """The file-level import graph of a package whose directory is ``root``.

    ``edges[src][dst]`` is the line of the first import in ``src`` of ``dst`` (paths relative to
    ``root``). ``from .pkg import name`` is an edge to ``pkg`` (its ``__init__.py``) and, when ``name``
    is a submodule, to that file too; ``from . import x`` likewise (the own package, then ``x``).

    Edges from a package's ``__init__.py`` to files inside that package (``facade``) are left out of
    ``edges``: that is the re-export facade, and Python has always begun importing a package's
    ``__init__`` before any file inside it, so such an edge never orders anything. Counting it would
    make every ``from . import keys`` a cycle. Edges *into* an ``__init__.py`` are counted, and so are
    its edges to other folders. ``raw`` keeps every edge.
    """

    def __init__(self, root: Path, package: str) -> None:
        self.root, self.package = root, package
        self.files: dict[str, str] = {}  # path -> dotted module name
        self.trees: dict[str, ast.Module] = {}
        self.lines: dict[str, int] = {}
        for path in sorted(root.rglob("*.py")):
            relpath = path.relative_to(root)
            if any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in relpath.parts[:-1]):
                continue
            parts = relpath.parts[:-1] if relpath.name == "__init__.py" else (*relpath.parts[:-1], relpath.stem)
            text = path.read_text(encoding="utf-8")
            self.files[relpath.as_posix()] = ".".join((package, *parts))
            self.trees[relpath.as_posix()] = ast.parse(text, filename=str(path))
            self.lines[relpath.as_posix()] = len(text.splitlines())
        self.modules: dict[str, str] = {}
        self.unresolved: list[str] = []
        for rel, mod in self.files.items():  # as in Python, a package directory wins over a same-named module
            if mod in self.modules:
                pkg, shadowed = sorted((rel, self.modules[mod]), key=lambda r: not r.endswith("__init__.py"))
                self.unresolved.append(f"{shadowed} is never imported: {pkg} takes its name")
                rel = pkg
            self.modules[mod] = rel
        self.files = {rel: mod for rel, mod in self.files.items() if self.modules[mod] == rel}
        # Directories without an __init__.py (namespace packages; uninstalled_packages reports them).
        self.namespaces = {m.rpartition(".")[0] for m in self.files.values()} - set(self.modules)
        self.raw: dict[str, dict[str, int]] = {rel: {} for rel in self.files}
        for rel in self.files:
            for node in ast.walk(self.trees[rel]):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for dst in self._targets(rel, node):
                        if dst != rel:
                            self.raw[rel].setdefault(dst, node.lineno)
        self.edges: dict[str, dict[str, int]] = {}
        self.facade = 0
        for src, dsts in self.raw.items():
            own = self.files[src] + "." if src.endswith("__init__.py") else None
            self.edges[src] = {d: n for d, n in dsts.items() if not (own and self.files[d].startswith(own))}
            self.facade += len(dsts) - len(self.edges[src])

    def _targets(self, rel: str, node: ast.Import | ast.ImportFrom) -> list[str]:
        def internal(mod: str) -> bool:
            return mod == self.package or mod.startswith(self.package + ".")

        def need(mod: str) -> list[str]:
            if mod in self.modules or mod in self.namespaces:
                return [self.modules[mod]] if mod in self.modules else []
            self.unresolved.append(f"{rel}:{node.lineno} imports {mod}, which is no file of the package")
            return []

        if isinstance(node, ast.Import):
            return [f for a in node.names if internal(a.name) for f in need(a.name)]
        if node.level == 0:
            if not node.module or not internal(node.module):
                return []
            base = node.module
        else:
            here = self.files[rel].split(".")
            if not rel.endswith("__init__.py"):
                here = here[:-1]  # a module's own package
            if node.level - 1 >= len(here):
                self.unresolved.append(f"{rel}:{node.lineno} imports beyond the top of the package")
                return []
            base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
        out = need(base)
        out += [self.modules[f"{base}.{a.name}"] for a in node.names if f"{base}.{a.name}" in self.modules]
        return out

    def folder(self, rel: str) -> str:
        """The top-level folder of a file; ``""`` for a file at the root."""
        return rel.split("/", 1)[0] if "/" in rel else ""


def find_cycles(g: Graph) -> list[list[str]]:
    """For each import edge inside a strongly connected component, the shortest cycle through it, so
    every edge to cut is shown; each cycle starts at its smallest path and is closed (``[a, b, a]``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred files at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc: set[str] = set()
            while v not in scc:
                scc.add(stack.pop())
            on.difference_update(scc)
            if len(scc) > 1:
                sccs.append(scc)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g.edges) + 100))
    for v in sorted(g.edges):
        if v not in index:
            connect(v)
    cycles: list[list[str]] = []
    for scc in sccs:
        for u in sorted(scc):
            for v in sorted(w for w in g.edges[u] if w in scc):
                prev = {v: v}
                todo = deque([v])
                while u not in prev:  # breadth first from v back to u, inside the component
                    x = todo.popleft()
                    for w in sorted(g.edges[x]):
                        if w in scc and w not in prev:
                            prev[w] = x
                            todo.append(w)
                path = [u]
                while path[-1] != v:
                    path.append(prev[path[-1]])
                path.reverse()  # v ... u
                cyc = [u, *path[:-1]]
                i = cyc.index(min(cyc))
                cyc = cyc[i:] + cyc[:i]
                if cyc + cyc[:1] not in cycles:
                    cycles.append(cyc + cyc[:1])
    return sorted(cycles)


def format_cycle(g: Graph, cyc: list[str]) -> str:
    where = ", ".join(f"{a}:{g.edges[a][b]}" for a, b in zip(cyc, cyc[1:]))
    return " -> ".join(cyc) + f"    ({where})"


def layering_violations(g: Graph, layers: dict[str, int] = LAYERS,
                        allowed: set[tuple[str, str]] = SAME_RANK_ALLOWED) -> list[str]:
    """Imports between top-level folders that go sideways or up.

    The root ``__init__.py`` is the public face and may import anything. Importing it (``import nalar``)
    means importing every folder it re-exports, so only folders above all of those may do it.
    """
    out = [f"{rel}: folder {g.folder(rel)!r} has no layer (add it to LAYERS)"
           for rel in g.files if rel != "__init__.py" and g.folder(rel) not in layers]
    face = [layers[g.folder(d)] for d in g.raw.get("__init__.py", {}) if g.folder(d) in layers]
    face_rank = max(face, default=-1)
    found: dict[tuple[str, int, str], str] = {}  # one line per import statement and folder
    for src, dsts in sorted(g.raw.items()):
        a = g.folder(src)
        if src == "__init__.py" or a not in layers:
            continue
        for dst, line in sorted(dsts.items(), key=lambda d: d[0].endswith("__init__.py")):
            b = g.folder(dst)
            if dst == "__init__.py":
                if layers[a] <= face_rank:
                    found.setdefault((src, line, b), f"{src}:{line} imports the package root, which re-exports "
                                     "its own layer or one above; import the module itself")
            elif a != b and b in layers and layers[a] <= layers[b] and (a, b) not in allowed:
                found.setdefault((src, line, b), f"{src}:{line} imports {dst}: {a}/ may not import {b}/")
    return out + [found[k] for k in sorted(found)]


def type_checking_methods(g: Graph) -> list[str]:
    """``def`` statements that are both in a class and under ``if TYPE_CHECKING:`` (in either order)."""
    out: list[str] = []

    def is_tc(test: ast.expr) -> bool:
        return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")

    def visit(rel: str, node: ast.AST, cls: str | None, tc: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if cls and tc:
                    out.append(f"{rel}:{child.lineno} {cls}.{child.name} is declared under TYPE_CHECKING")
                continue  # a function body is another scope
            if isinstance(child, ast.ClassDef):
                visit(rel, child, child.name, tc)
            elif isinstance(child, ast.If) and is_tc(child.test):
                for stmt in child.body:
                    visit(rel, ast.Module(body=[stmt], type_ignores=[]), cls, True)
                for stmt in child.orelse:
                    visit(rel, ast.Module(body=[stmt], type_ignores=[]), cls, tc)
            else:
                visit(rel, child, cls, tc)

    for rel, tree in g.trees.items():
        visit(rel, tree, None, False)
    return out


def oversized_executor_files(g: Graph) -> list[str] | None:
    """Executor files over the limit; ``None`` while the executor package does not exist."""
    if not (g.root / EXECUTOR_DIR).is_dir():
        return None
    return [f"{rel}: {n} lines (limit {EXECUTOR_MAX_LINES})" for rel, n in sorted(g.lines.items())
            if rel.startswith(EXECUTOR_DIR + "/") and n > EXECUTOR_MAX_LINES]


def uninstalled_packages(g: Graph) -> list[str]:
    """Package directories that ``pip install .`` (the Dockerfile) would leave out of the wheel."""
    # Only ``packages`` matters: ``package-dir`` maps a sub-package under its parent's directory anyway.
    listed = set(tomllib.loads((g.root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    out = [f"{d}/ holds Python files but no __init__.py" for d in sorted({r.rpartition("/")[0] for r in g.files})
           if d and f"{d}/__init__.py" not in g.files]
    for rel, mod in sorted(g.files.items()):
        if rel.endswith("__init__.py") and mod not in listed:
            out.append(f"{mod} ({rel}) is not in pyproject's [tool.setuptools] packages")
    return out


# -- the checks on this package ---------------------------------------------------------------------

_GRAPH: list[Graph] = []


def graph() -> Graph:
    if not _GRAPH:
        _GRAPH.append(Graph(ROOT, PACKAGE))
    return _GRAPH[0]


def test_no_import_cycle() -> None:
    g = graph()
    cycles = find_cycles(g)
    assert not cycles, "import cycles between files:\n" + "\n".join(format_cycle(g, c) for c in cycles)


def test_folders_import_one_way() -> None:
    bad = layering_violations(graph())
    assert not bad, "imports against the layering (bus < state < actors < policy < cli, workloads):\n" + "\n".join(bad)


def test_executor_files_are_short() -> None:
    g = graph()
    bad = oversized_executor_files(g)
    assert bad is not None, f"{EXECUTOR_DIR}/ is gone: the executor is one part per file there"
    assert not bad, "\n".join(bad)


def test_no_methods_under_type_checking() -> None:
    bad = type_checking_methods(graph())
    assert not bad, "methods declared only for the type checker (a class split across files):\n" + "\n".join(bad)


def test_internal_imports_resolve() -> None:
    # An unresolved import is a stale name, or a gap in Graph that would hide edges from the checks above;
    # a module shadowed by a same-named package is dead code the graph leaves out.
    assert not graph().unresolved, "\n".join(graph().unresolved)


def test_every_package_is_installed() -> None:
    bad = uninstalled_packages(graph())
    assert not bad, "\n".join(bad)


# -- the checker itself, on synthetic packages ------------------------------------------------------

def _package(root: Path, files: dict[str, str]) -> Graph:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return Graph(root, "pkg")


def test_checker_finds_cycles_and_passes_acyclic(tmp_path: Path) -> None:
    base = {
        "__init__.py": "from pkg.low import api\nfrom pkg.low.api import f\n",
        "low/__init__.py": "from .api import f\nfrom . import util\n",
        "low/api.py": "from . import util\nfrom .util import g\n",
        "low/util.py": "import os\n",
        "high/__init__.py": "",
        "high/user.py": "import pkg\nfrom ..low import api\n",
    }
    g = _package(tmp_path / "ok", base)
    assert find_cycles(g) == []
    assert g.unresolved == []
    assert g.edges["low/api.py"] == {"low/__init__.py": 1, "low/util.py": 1}  # own package, then the submodule
    assert g.edges["low/__init__.py"] == {} and g.facade == 2 + 2  # root -> low, low/api; low -> api, util
    assert g.edges["high/user.py"] == {"__init__.py": 1, "low/__init__.py": 2, "low/api.py": 2}
    assert type_checking_methods(g) == []

    bad = {**base,
           "low/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cyc import B\n",
           "low/cyc.py": "class B:\n    if TYPE_CHECKING:\n        def _x(self): ...\n"
                         "def f():\n    from pkg.low.api import f\n",
           "low/api.py": "from . import util\nfrom pkg.nothere import x\n"}
    g = _package(tmp_path / "bad", bad)
    assert [" -> ".join(c) for c in find_cycles(g)] == ["low/api.py -> low/util.py -> low/cyc.py -> low/api.py"]
    assert format_cycle(g, find_cycles(g)[0]).endswith("(low/api.py:1, low/util.py:3, low/cyc.py:5)")
    assert g.unresolved == ["low/api.py:2 imports pkg.nothere, which is no file of the package"]
    assert type_checking_methods(g) == ["low/cyc.py:3 B._x is declared under TYPE_CHECKING"]


def test_checker_layering(tmp_path: Path) -> None:
    g = _package(tmp_path, {
        "__init__.py": "from .state import s\n",
        "bus/__init__.py": "", "bus/b.py": "from ..state import s\n",
        "state/__init__.py": "", "state/s.py": "from ..bus import b\nimport pkg\n",
        "policy/__init__.py": "", "policy/p.py": "import pkg\nfrom pkg.cli import c\n",
        "cli/__init__.py": "", "cli/c.py": "from ..workloads import w\n",
        "workloads/__init__.py": "", "workloads/w.py": "from ..cli import c\n",
        "extra/x.py": "",
    })
    assert layering_violations(g) == [
        "extra/x.py: folder 'extra' has no layer (add it to LAYERS)",
        "bus/b.py:1 imports state/s.py: bus/ may not import state/",
        "policy/p.py:2 imports cli/c.py: policy/ may not import cli/",
        "state/s.py:2 imports the package root, which re-exports its own layer or one above; import the module itself",
        "workloads/w.py:1 imports cli/c.py: workloads/ may not import cli/",
    ]


def test_checker_packages(tmp_path: Path) -> None:
    g = _package(tmp_path, {
        "pyproject.toml": '[tool.setuptools]\npackage-dir = {"pkg" = "."}\npackages = ["pkg", "pkg.a", "pkg.b"]\n',
        "__init__.py": "", "a/__init__.py": "", "b/__init__.py": "", "c/__init__.py": "", "c.py": "", "d/x.py": "",
    })
    assert g.unresolved == ["c.py is never imported: c/__init__.py takes its name"]
    assert uninstalled_packages(g) == [
        "d/ holds Python files but no __init__.py",
        "pkg.c (c/__init__.py) is not in pyproject's [tool.setuptools] packages",
    ]


# -- as a script ------------------------------------------------------------------------------------

def main() -> int:
    g = graph()
    cross: dict[tuple[str, str], int] = {}
    for src, dsts in g.raw.items():
        for dst in dsts:
            a, b = g.folder(src) or "(root)", g.folder(dst) or "(root)"
            if a != b:
                cross[a, b] = cross.get((a, b), 0) + 1
    print(f"{len(g.files)} files, {sum(map(len, g.edges.values()))} import edges between files "
          f"(+{g.facade} from an __init__.py to its own files, not counted)")
    print("between folders:", ", ".join(f"{a} -> {b} {n}" for (a, b), n in sorted(cross.items())))
    print("largest files:", ", ".join(f"{r} {n}" for r, n in sorted(g.lines.items(), key=lambda x: -x[1])[:8]))
    executor = oversized_executor_files(g)
    checks = {
        "import cycles": [format_cycle(g, c) for c in find_cycles(g)],
        "layering violations": layering_violations(g),
        f"executor files over {EXECUTOR_MAX_LINES} lines": executor or [],
        "methods under TYPE_CHECKING": type_checking_methods(g),
        "unresolved imports, shadowed modules": g.unresolved,
        "packages missing from pyproject": uninstalled_packages(g),
    }
    for name, found in checks.items():
        print(f"{name}: {len(found)}" + ("" if executor is not None or "executor" not in name
                                          else f" (skipped: no {EXECUTOR_DIR}/ yet)"))
        for line in found:
            print("   ", line)
    return 1 if any(checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
