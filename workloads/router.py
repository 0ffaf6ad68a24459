"""Router (the paper's imbalanced workload): a light classifier sends each query down one of two branches.

Per request (``Router.route(query, label)``, its own session)::

    Router.route ─ ClassifierLLM.generate (CLASSIFY_TOKENS)
                   ├─ "chat" → ChatWorkflow.respond ─ ChatLLM.chat draft (CHAT_DRAFT_TOKENS)
                   │                                 └ ChatLLM.chat refine (CHAT_REFINE_TOKENS)
                   └─ "code" → CodingAgent.solve ─ DocRetrieval.retrieve
                                                  ├ CoderLLM.generate plan (CODE_PLAN_TOKENS)
                                                  └ CoderLLM.generate code (CODE_WRITE_TOKENS)

The branch is model-driven control flow: the classifier's output decides it when its first word is a
label (``chat`` or ``code``). With simulated engines or dummy weights that output is filler, never a
label, so the request's own ground-truth ``label`` decides instead; ``decided_by`` in the result says
which one did. Labels are drawn with ``$NALAR_ROUTER_SKEW`` (default 0.9) of the requests to ``chat``,
so at least 90% of the load lands on one branch, as in the production traces the paper replays.

Every node gets the same static share of "GPUs" (one instance each of ClassifierLLM, ChatLLM and
CoderLLM); the nalar configuration may move instances from the idle branch's pool to the hot one
(``proportional``), the baseline cannot. The second call of each branch extends the first one's prompt, so
it finds its prefix cached when it runs where the first did.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any, Iterator

import nalar

from .models import ChatLLM, ClassifierLLM, CoderLLM, usage
from .spec import Session, Turn, WorkloadSpec, poisson_arrivals
from .tools import DocRetrieval

#: Output tokens per LLM call.
CLASSIFY_TOKENS = 4
CHAT_DRAFT_TOKENS = 160
CHAT_REFINE_TOKENS = 96
CODE_PLAN_TOKENS = 64
CODE_WRITE_TOKENS = 160
#: Documentation passages the coding agent reads.
DOC_PASSAGES = 3
#: Share of requests labelled ``chat`` unless ``$NALAR_ROUTER_SKEW`` says otherwise.
DEFAULT_SKEW = 0.9
LABELS = ("chat", "code")

CLASSIFY_PROMPT = ("Classify the user request as 'chat' (conversation, writing, advice) or 'code' (programming, "
                   "debugging, SQL, APIs). Answer with one word.\nRequest: {query}\nLabel:")
CHAT_SYSTEM = "You are a helpful, concise assistant."
CODE_PROMPT = ("You are an expert Python engineer.\nRelevant documentation:\n{docs}\n\nTask: {query}\n"
               "First, a short plan:\n")


def skew() -> float:
    """The share of requests labelled ``chat``: ``$NALAR_ROUTER_SKEW``, a number in [0, 1]."""
    raw = os.environ.get("NALAR_ROUTER_SKEW", "")
    try:
        v = float(raw) if raw else DEFAULT_SKEW
    except ValueError:
        raise ValueError(f"$NALAR_ROUTER_SKEW must be a number in [0, 1], not {raw!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"$NALAR_ROUTER_SKEW must be in [0, 1], not {v}")
    return v


def parse_label(text: str) -> str | None:
    """The branch the classifier's output names, if its first word is one of ``LABELS``."""
    m = re.match(r"\W*([A-Za-z]+)", text)
    word = m.group(1).lower() if m else ""
    return word if word in LABELS else None


@nalar.hints(max_concurrency=None)
class ChatWorkflow(nalar.Agent):
    """Draft an answer, then refine it (the second call extends the first one's conversation)."""

    llm = nalar.stub(ChatLLM)

    async def respond(self, query: str) -> dict[str, Any]:
        msgs = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": query}]
        draft = await self.llm.chat(msgs, max_tokens=CHAT_DRAFT_TOKENS, ignore_eos=True)
        msgs += [{"role": "assistant", "content": draft["text"]},
                 {"role": "user", "content": "Check the draft for mistakes and missing points; give the final answer."}]
        final = await self.llm.chat(msgs, max_tokens=CHAT_REFINE_TOKENS, ignore_eos=True)
        return {"answer": final["text"], "steps": [usage(draft), usage(final)]}


@nalar.hints(max_concurrency=None)
class CodingAgent(nalar.Agent):
    """Retrieve documentation, plan, then write the code (the second prompt extends the first)."""

    docs = nalar.stub(DocRetrieval)
    llm = nalar.stub(CoderLLM)

    async def solve(self, query: str) -> dict[str, Any]:
        passages = await self.docs.retrieve(query, DOC_PASSAGES)
        prompt = CODE_PROMPT.format(query=query, docs="\n".join(f"[{p['source']} / {p['heading']}] {p['text']}"
                                                                for p in passages))
        plan = await self.llm.generate(prompt, max_tokens=CODE_PLAN_TOKENS, ignore_eos=True)
        prompt += plan["text"] + "\nNow the code, in one Python block:\n"
        code = await self.llm.generate(prompt, max_tokens=CODE_WRITE_TOKENS, ignore_eos=True)
        return {"plan": plan["text"], "code": code["text"], "sources": [f"{p['source']}#{p['heading']}" for p in passages],
                "steps": [usage(plan), usage(code)]}


@nalar.hints(max_concurrency=None)
class Router(nalar.Agent):
    """The entry point: classify, then run one branch."""

    classifier = nalar.stub(ClassifierLLM)
    chat = nalar.stub(ChatWorkflow)
    coder = nalar.stub(CodingAgent)

    async def route(self, query: str, label: str) -> dict[str, Any]:
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        c = await self.classifier.generate(CLASSIFY_PROMPT.format(query=query), max_tokens=CLASSIFY_TOKENS,
                                           ignore_eos=True)
        predicted = parse_label(c["text"])
        branch = predicted or label
        result = await (self.chat.respond(query) if branch == "chat" else self.coder.solve(query))
        return {"session": nalar.session(), "branch": branch, "label": label,
                "decided_by": "model" if predicted else "label", "classifier": usage(c), "result": result,
                "llm_calls": 1 + len(result["steps"])}


# -- load ----------------------------------------------------------------------------------------------

CHAT_QUERIES = (
    "Write a polite email to my landlord asking to fix the {thing} before the end of the {period}.",
    "Give me three ideas for a {adj} weekend trip near the coast.",
    "Explain the difference between {a} and {b} in plain language.",
    "Help me prepare for a job interview as a {job}: what questions should I expect?",
    "Summarise the pros and cons of {a} versus {b} for a small family.",
    "Draft a short speech for my friend's {event}, warm and a little funny.",
    "How can I build a habit of {habit} when I keep giving up after a week?",
    "Suggest a {adj} dinner menu for six people with one vegetarian guest.",
)
CODE_QUERIES = (
    "Write a Python function that reads a JSON Lines file and returns the records whose '{field}' is missing.",
    "Fix my asyncio code: tasks created with create_task disappear before they finish. How do I {verb} them?",
    "Write an SQL query that returns each user's latest order using a window function, for a table of {things}.",
    "Implement a token bucket rate limiter in Python that answers HTTP 429 with a Retry-After header.",
    "How do I avoid SQL injection when inserting {things} into sqlite3 from Python?",
    "Write a pytest fixture that creates a temporary sqlite database of {things} and tears it down.",
    "Write an async Python client that fetches {n} URLs concurrently with a semaphore and a timeout.",
    "Write a Python script that paginates a REST API with cursor pagination and stores {things} as JSON.",
)
_FILL = {
    "thing": ("heating", "kitchen tap", "front door lock", "broken window"), "period": ("week", "month"),
    "adj": ("cheap", "relaxing", "romantic", "family-friendly"), "a": ("renting", "index funds", "tea", "trains"),
    "b": ("buying", "savings accounts", "coffee", "flights"), "job": ("nurse", "teacher", "data analyst", "chef"),
    "event": ("wedding", "retirement party", "fortieth birthday"), "habit": ("running", "reading", "journaling"),
    "field": ("email", "price", "timestamp"), "verb": ("keep and await", "cancel", "time out"),
    "things": ("orders", "users", "invoices", "events"), "n": ("20", "100", "500"),
}


def make_query(rng: random.Random, label: str) -> str:
    template = rng.choice(CHAT_QUERIES if label == "chat" else CODE_QUERIES)
    return template.format(**{k: rng.choice(v) for k, v in _FILL.items()})


def sessions(rng: random.Random, rps: float, duration: float) -> Iterator[tuple[float, Session]]:
    """Single-turn sessions (session id = request id), labels drawn with ``skew()`` to ``chat``."""
    share = skew()
    for i, t in enumerate(poisson_arrivals(rng, rps, duration)):
        label = "chat" if rng.random() < share else "code"
        yield t, Session(f"router-{i:06d}", [Turn([make_query(rng, label), label])])


_M = "nalar.workloads.router"
NODE = [f"{_M}:Router=1", f"{_M}:ChatWorkflow=1", f"{_M}:CodingAgent=1", "nalar.workloads.tools:DocRetrieval=1",
        "nalar.workloads.models:ClassifierLLM=1", "nalar.workloads.models:ChatLLM=1",
        "nalar.workloads.models:CoderLLM=1"]

WORKLOAD = WorkloadSpec(
    name="router",
    summary="router: a light classifier sends each query to a chat workflow or a coding agent; "
            "branch mix skewed by $NALAR_ROUTER_SKEW (default 90% chat); equal static GPUs per branch",
    entry="Router.route",
    nodes=[list(NODE), list(NODE)],
    policies=("balance", "proportional", "affinity"),
    sessions=sessions,
    default_rps=80.0,
    default_duration=60.0,
    timeout_s=600.0,
)
