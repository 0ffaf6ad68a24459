"""Software company (MetaGPT-style; the paper's recursive workload with failures and re-entry).

Per project (``Company.build(project)``, one session)::

    Company.build ─ ProductManager.write_prd ─ WebSearch.search ─ SweLLM (PRD_TOKENS)
                  ─ Architect.design         ─ DocRetrieval.retrieve ─ SweLLM (DESIGN_TOKENS)  → tasks
                  ─ Engineer.implement(task, depth=0)  x 3..6 tasks, in parallel, each:
                        SweLLM plan (PLAN_TOKENS) → split?
                          yes (depth < MAX_DEPTH): Engineer.implement(subtask, depth+1) in parallel (recursion),
                                                   then SweLLM integrate (INTEGRATE_TOKENS)
                          no: DocRetrieval.retrieve, SweLLM code (CODE_TOKENS)
                        QA.review ─ SweLLM (REVIEW_TOKENS) → PASS, or FAIL: the call raises ``TaskFailed``
                  ─ QA.integrate ─ SweLLM (FINAL_TOKENS)

Re-entry: a failed review fails the engineer's call (so the node records a failed call of the session,
which is what the ``lpt`` policy looks at), and whoever submitted the task (the company, or the parent
engineer for a subtask) submits it again, at most ``MAX_REENTRIES`` times; the last attempt is
accepted whatever the review says. A re-entered task is done again from its plan, subtasks included.

Control flow follows the model's output where it parses and the project's spec where it does not
(with simulated engines or dummy weights it never parses; real models are asked for these forms):
the architect's ``TASK: name`` lines (else ``project["tasks"]``), the engineer's ``SPLIT: a; b`` or
``DIRECT`` (else the task's ``subtasks``), QA's ``PASS``/``FAIL`` (else a draw seeded by the project's
``seed``, the task's path and the attempt, failing with probability ``project["fail_rate"]``). So a
project's shape and failures are reproducible from its spec, on every backend.
"""
from __future__ import annotations

import asyncio
import random
import re
from typing import Any, Iterator

import nalar

from .models import SweLLM, usage
from .spec import Session, Turn, WorkloadSpec, poisson_arrivals
from .tools import DocRetrieval, WebSearch

#: Output tokens per LLM call.
PRD_TOKENS = 160
DESIGN_TOKENS = 160
PLAN_TOKENS = 32
CODE_TOKENS = 192
INTEGRATE_TOKENS = 96
REVIEW_TOKENS = 24
FINAL_TOKENS = 128
#: Top-level tasks per project, drawn uniformly in this range.
MIN_TASKS, MAX_TASKS = 3, 6
#: Chance that a task (depth 0) / a subtask (depth 1) is split; subtasks per split.
SPLIT_RATE = 0.35
SUBSPLIT_RATE = 0.2
MIN_SUBTASKS, MAX_SUBTASKS = 2, 3
#: Deepest level an engineer works at: depth 0 tasks, 1 and 2 subtasks.
MAX_DEPTH = 2
#: Chance that a review fails (when the model's verdict does not parse).
FAIL_RATE = 0.25
#: Times a failed task is submitted again before its last attempt is accepted.
MAX_REENTRIES = 2
#: Characters of the PRD and of the design carried into later prompts.
PRD_CHARS = 1200
DESIGN_CHARS = 1200


class TaskFailed(Exception):
    """A task whose review failed: its engineer's call raises this, and the task is submitted again."""


def context(project: dict[str, Any]) -> str:
    """The prefix every engineer and QA prompt of a project starts with (shared: prefix-cacheable)."""
    return f"Project: {project['idea']}\nDesign:\n{project.get('design', '')}\n"


def review_draw(seed: int, path: str, attempt: int, fail_rate: float) -> str:
    """The seeded verdict used when the model's does not parse: the same for the same project spec."""
    return "FAIL" if random.Random(f"{seed}:{path}:{attempt}").random() < fail_rate else "PASS"


def parse_verdict(text: str) -> str | None:
    m = re.match(r"\W*(PASS|FAIL)\b", text)
    return m.group(1) if m else None


def parse_split(text: str, path: str) -> list[dict[str, Any]] | None:
    """Subtasks from ``SPLIT: a; b`` (``[]`` for ``DIRECT``), or ``None`` when the plan does not say."""
    m = re.search(r"SPLIT:\s*(.+)", text)
    if m:
        names = [n.strip() for n in m.group(1).split(";") if n.strip()][:MAX_SUBTASKS]
        return [{"name": n, "path": f"{path}/{i}", "subtasks": []} for i, n in enumerate(names)]
    return [] if re.search(r"\bDIRECT\b", text) else None


def parse_tasks(text: str) -> list[dict[str, Any]]:
    names = re.findall(r"^TASK:\s*(.+)$", text, re.M)[:MAX_TASKS]
    return [{"name": n.strip(), "path": f"t{i}", "subtasks": []} for i, n in enumerate(names)]


async def implement_with_reentry(engineer: Any, project: dict[str, Any], task: dict[str, Any],
                                 depth: int) -> dict[str, Any]:
    """Submit a task; on ``TaskFailed`` submit it again, up to ``MAX_REENTRIES`` times."""
    failures: list[str] = []
    for attempt in range(MAX_REENTRIES + 1):
        try:
            r: dict[str, Any] = await engineer.implement(project, task, depth, attempt)
        except nalar.RemoteError as e:
            if e.type != "TaskFailed" or attempt >= MAX_REENTRIES:
                raise
            failures.append(e.message)
            continue
        r["reentries"] = attempt
        r["failures"] = failures
        return r
    raise AssertionError("unreachable: the last attempt is always accepted")


def tree_stats(r: dict[str, Any]) -> dict[str, int]:
    """Totals over a task's result tree: re-entries, accepted attempts' tasks, deepest level."""
    out = {"reentries": r["reentries"], "tasks": 1, "max_depth": r["depth"]}
    for s in r["subtasks"]:
        sub = tree_stats(s)
        out["reentries"] += sub["reentries"]
        out["tasks"] += sub["tasks"]
        out["max_depth"] = max(out["max_depth"], sub["max_depth"])
    return out


@nalar.hints(max_concurrency=None)
class ProductManager(nalar.Agent):
    """Researches the idea on the web and writes the PRD."""

    web = nalar.stub(WebSearch)
    llm = nalar.stub(SweLLM)

    async def write_prd(self, idea: str) -> dict[str, Any]:
        hits = await self.web.search(idea, 3)
        research = "\n".join(f"- {h['title']}: {h['snippet']}" for h in hits)
        out = await self.llm.generate(f"You are a product manager. Write a PRD (goals, user stories, acceptance "
                                      f"criteria) for: {idea}\nMarket research:\n{research}\nPRD:\n",
                                      max_tokens=PRD_TOKENS, ignore_eos=True)
        return {"prd": out["text"], "sources": [h["id"] for h in hits], "llm": usage(out)}


@nalar.hints(max_concurrency=None)
class Architect(nalar.Agent):
    """Designs the system from the PRD and library docs, and cuts it into tasks."""

    docs = nalar.stub(DocRetrieval)
    llm = nalar.stub(SweLLM)

    async def design(self, idea: str, prd: str, spec_tasks: list[dict[str, Any]]) -> dict[str, Any]:
        passages = await self.docs.retrieve(f"{idea} {' '.join(t['name'] for t in spec_tasks)}", 3)
        docs = "\n".join(f"[{p['source']} / {p['heading']}] {p['text']}" for p in passages)
        out = await self.llm.generate(f"You are a software architect. Project: {idea}\nPRD:\n{prd[:PRD_CHARS]}\n"
                                      f"Reference documentation:\n{docs}\nWrite the design (modules, data model, "
                                      f"APIs), then one line 'TASK: name' per implementation task.\n",
                                      max_tokens=DESIGN_TOKENS, ignore_eos=True)
        tasks = parse_tasks(out["text"])
        return {"design": out["text"], "tasks": tasks or spec_tasks, "tasks_by": "model" if tasks else "spec",
                "llm": usage(out)}


@nalar.hints(max_concurrency=None)
class QA(nalar.Agent):
    """Reviews each implementation, and signs off the integrated project."""

    llm = nalar.stub(SweLLM)

    async def review(self, project: dict[str, Any], path: str, work: str, attempt: int) -> dict[str, Any]:
        out = await self.llm.generate(f"{context(project)}You are QA. Review task {path}:\n{work}\n"
                                      f"Answer PASS or FAIL, then the reasons.\nVerdict:", max_tokens=REVIEW_TOKENS,
                                      ignore_eos=True)
        verdict = parse_verdict(out["text"])
        if verdict is not None:
            return {"verdict": verdict, "decided_by": "model", "llm": usage(out)}
        return {"verdict": review_draw(project["seed"], path, attempt, project["fail_rate"]), "decided_by": "draw",
                "llm": usage(out)}

    async def integrate(self, project: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        out = await self.llm.generate(f"{context(project)}You are QA. All tasks are merged: {', '.join(paths)}.\n"
                                      f"Write the integration test plan and release notes.\n",
                                      max_tokens=FINAL_TOKENS, ignore_eos=True)
        return {"report": out["text"], "llm": usage(out)}


@nalar.hints(max_concurrency=None)
class Engineer(nalar.Agent):
    """Implements one task: plans, splits into subtasks (recursively) or writes the code, gets it reviewed."""

    me = nalar.stub("Engineer")
    docs = nalar.stub(DocRetrieval)
    qa = nalar.stub(QA)
    llm = nalar.stub(SweLLM)

    async def implement(self, project: dict[str, Any], task: dict[str, Any], depth: int,
                        attempt: int) -> dict[str, Any]:
        path = task["path"]
        prompt = (f"{context(project)}You are an engineer. Task {path}: {task['name']}\n"
                  f"Plan it; answer 'SPLIT: a; b' to split it into subtasks, or 'DIRECT'.\nPlan:\n")
        plan = await self.llm.generate(prompt, max_tokens=PLAN_TOKENS, ignore_eos=True)
        subtasks: list[dict[str, Any]] = []
        split_by = "depth limit"
        if depth < MAX_DEPTH:
            parsed = parse_split(plan["text"], path)
            subtasks, split_by = (task["subtasks"], "spec") if parsed is None else (parsed, "model")
        prompt += plan["text"]
        results: list[dict[str, Any]] = []
        if subtasks:
            results = list(await asyncio.gather(*(implement_with_reentry(self.me, project, s, depth + 1)
                                                  for s in subtasks)))
            prompt += "\nIntegrate the subtasks: " + ", ".join(s["name"] for s in subtasks) + "\n"
            work = await self.llm.generate(prompt, max_tokens=INTEGRATE_TOKENS, ignore_eos=True)
        else:
            passages = await self.docs.retrieve(task["name"], 2)
            prompt += "\nDocs:\n" + "\n".join(p["text"] for p in passages) + "\nCode:\n"
            work = await self.llm.generate(prompt, max_tokens=CODE_TOKENS, ignore_eos=True)
        review = await self.qa.review(project, path, work["text"], attempt)
        if review["verdict"] == "FAIL" and attempt < MAX_REENTRIES:
            raise TaskFailed(f"{path}: review failed on attempt {attempt} (verdict by {review['decided_by']})")
        return {"path": path, "name": task["name"], "status": "done", "depth": depth, "attempt": attempt,
                "split_by": split_by,
                "verdict": review["verdict"], "verdict_by": review["decided_by"],
                "accepted": "review" if review["verdict"] == "PASS" else "last attempt",
                "subtasks": results, "work": usage(work)}


@nalar.hints(max_concurrency=None)
class Company(nalar.Agent):
    """The entry point: PRD, design, parallel implementation with re-entry, final QA."""

    pm = nalar.stub(ProductManager)
    architect = nalar.stub(Architect)
    engineer = nalar.stub(Engineer)
    qa = nalar.stub(QA)

    async def build(self, project: dict[str, Any]) -> dict[str, Any]:
        prd = await self.pm.write_prd(project["idea"])
        design = await self.architect.design(project["idea"], prd["prd"], project["tasks"])
        proj = {"idea": project["idea"], "seed": int(project["seed"]),
                "fail_rate": float(project.get("fail_rate", FAIL_RATE)), "design": design["design"][:DESIGN_CHARS]}
        results = list(await asyncio.gather(*(implement_with_reentry(self.engineer, proj, t, 0)
                                              for t in design["tasks"])))
        final = await self.qa.integrate(proj, [r["path"] for r in results])
        stats = [tree_stats(r) for r in results]
        return {"session": nalar.session(), "idea": project["idea"], "tasks_by": design["tasks_by"],
                "tasks_planned": len(design["tasks"]), "tasks": results,
                "reentries": sum(s["reentries"] for s in stats), "implemented": sum(s["tasks"] for s in stats),
                "max_depth": max((s["max_depth"] for s in stats), default=0),
                "final": {"llm": final["llm"]}, "prd": prd["llm"], "design": design["llm"]}


# -- load ----------------------------------------------------------------------------------------------

IDEAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a URL shortener with click analytics", ("short code generator", "redirect service", "click analytics",
     "link management API", "admin dashboard", "abuse blocklist", "storage layer")),
    ("a todo list web app with recurring reminders", ("task model and storage", "REST API", "reminder scheduler",
     "recurrence rules", "sharing and permissions", "web front end", "notifications")),
    ("a markdown blog engine", ("markdown rendering", "HTML sanitiser", "post storage", "tag pages", "RSS feed",
     "admin editor", "comment moderation")),
    ("a real-time chat server", ("WebSocket gateway", "room membership", "message history", "presence",
     "push notifications", "rate limiting", "moderation tools")),
    ("an expense splitting app for groups", ("expense ledger", "balance calculation", "settle-up planner",
     "currency handling", "group management", "REST API", "mobile front end")),
    ("an inventory tracker for a small shop", ("product catalogue", "stock movements", "barcode scanning",
     "purchase orders", "low-stock alerts", "reports", "user accounts")),
    ("a weather dashboard aggregating forecasts", ("forecast provider clients", "response cache",
     "location search", "unit conversion", "dashboard UI", "severe weather alerts")),
    ("a recipe manager with shopping lists", ("recipe importer", "ingredient parser", "unit conversion",
     "shopping list builder", "meal planner", "search")),
    ("a terminal snake game", ("game loop", "board rendering with curses", "input handling", "collision rules",
     "score keeping", "high score file")),
    ("a personal budget tracker", ("transaction import", "categorisation rules", "budgets per category",
     "double-entry ledger", "reports and charts", "data encryption")),
    ("a background job queue", ("job storage", "worker pool", "retry with backoff", "dead-letter queue",
     "scheduling of delayed jobs", "monitoring API")),
    ("an API rate limiter service", ("token bucket core", "distributed counters", "HTTP middleware",
     "configuration API", "metrics export", "load tests")),
    ("a library book lending system", ("catalogue search", "copies and loans", "holds queue", "late fees",
     "member accounts", "librarian dashboard")),
    ("a file backup and sync tool", ("tree scanner", "content hashing", "block transfer", "conflict resolution",
     "sync state database", "command-line interface")),
)
_ASPECTS = ("data model", "API", "core logic", "tests", "error handling", "UI")


def make_task(rng: random.Random, name: str, path: str, depth: int) -> dict[str, Any]:
    """A task and, drawn here, the subtasks an engineer splits it into when the model does not say."""
    rate = SPLIT_RATE if depth == 0 else SUBSPLIT_RATE
    subtasks = []
    if depth < MAX_DEPTH and rng.random() < rate:
        n = rng.randint(MIN_SUBTASKS, MAX_SUBTASKS)
        subtasks = [make_task(rng, f"{name}: {a}", f"{path}/{i}", depth + 1)
                    for i, a in enumerate(rng.sample(_ASPECTS, n))]
    return {"name": name, "path": path, "subtasks": subtasks}


def make_project(rng: random.Random) -> dict[str, Any]:
    idea, parts = rng.choice(IDEAS)
    n = rng.randint(MIN_TASKS, min(MAX_TASKS, len(parts)))
    return {"idea": idea, "seed": rng.getrandbits(31), "fail_rate": FAIL_RATE,
            "tasks": [make_task(rng, p, f"t{i}", 0) for i, p in enumerate(rng.sample(parts, n))]}


def sessions(rng: random.Random, rps: float, duration: float) -> Iterator[tuple[float, Session]]:
    """One session per project, one turn each."""
    for i, t in enumerate(poisson_arrivals(rng, rps, duration)):
        yield t, Session(f"swe-{i:05d}", [Turn([make_project(rng)])])


_M = "nalar.workloads.swe"
NODE = [f"{_M}:Company=1", f"{_M}:ProductManager=1", f"{_M}:Architect=1", f"{_M}:Engineer=1", f"{_M}:QA=1",
        "nalar.workloads.tools:WebSearch=1", "nalar.workloads.tools:DocRetrieval=1",
        "nalar.workloads.models:SweLLM=2"]

WORKLOAD = WorkloadSpec(
    name="swe",
    summary="software company: PM -> architect -> parallel engineers (recursive subtasks, depth <= 2) -> QA "
            "reviews that fail and re-enter tasks -> final QA; one shared LLM pool",
    entry="Company.build",
    nodes=[list(NODE), list(NODE)],
    policies=("balance", "srtf", "lpt", "head-of-line", "affinity"),
    sessions=sessions,
    default_rps=1.0,
    default_duration=120.0,
    timeout_s=600.0,
)
