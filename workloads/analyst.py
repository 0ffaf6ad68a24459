"""Financial analyst (the paper's stateful workload): follow-up questions in long-lived sessions.

Per turn (``Analyst.ask(question)``, session = the investor's conversation)::

    Analyst.ask ─┬─ MarketData.tickers                       (which companies; else the session's focus)
                 ├─ StockAnalyst.analyze    ─ MarketData.quote/fundamentals ─ AnalystLLM.chat
                 ├─ BondAnalyst.analyze     ─ MarketData.yields/fundamentals ─ AnalystLLM.chat   (concurrently)
                 ├─ MarketResearcher.analyze ─ MarketData.research           ─ AnalystLLM.chat
                 ├─ NewsAnalyst.analyze     ─ MarketData.news                ─ AnalystLLM.chat
                 └─ AnalystLLM.chat (summary over the whole conversation)  → history += this turn

Five LLM calls per turn, all on the one shared ``AnalystLLM`` pool: four specialist reports of
``SPECIALIST_TOKENS`` and a summary of ``SUMMARY_TOKENS``. The conversation lives in managed state
(``history``, ``focus``), so a follow-up arriving many seconds later, on whichever node, sees the
earlier turns. Every prompt of a session starts with the same system message and the conversation so
far (earlier questions with the specialists' reports, and the answers), so the prefix shared by a
session's prompts grows turn by turn: an LLM instance that served the session before holds most of the
next prompt in its prefix cache, which is what the affinity and migration policies play with.

Sessions have a geometric number of turns (mean ``MEAN_TURNS``, at most ``MAX_TURNS``) separated by
log-normal think times (median ``THINK_MEDIAN_S``; a heavier tail than an exponential's), with
FinQA-like questions about the fictional companies in ``corpora/finance.jsonl``.
"""
from __future__ import annotations

import json
import math
import random
from typing import Any, Iterator

import nalar

from .models import AnalystLLM, usage
from .spec import Session, Turn, WorkloadSpec, poisson_arrivals
from .tools import MarketData, finance_corpus

#: Output tokens of each specialist's report and of the summary.
SPECIALIST_TOKENS = 160
SUMMARY_TOKENS = 320
#: Tool output (JSON) put into a specialist's prompt, at most (about 4 characters a token).
DATA_CHARS = 1600
#: Companies one turn looks at, at most.
MAX_TICKERS = 3
#: Turns per session: geometric with this mean, capped.
MEAN_TURNS = 3.0
MAX_TURNS = 8
#: Think time before a follow-up: log-normal with this median and sigma (mean = median * e^(sigma^2/2)), capped.
THINK_MEDIAN_S = 6.0
THINK_SIGMA = 1.0
THINK_MAX_S = 120.0

SYSTEM = ("You are the lead of a team of financial analysts answering an investor's questions about listed "
          "companies and the bond market. Specialists report on stocks, bonds, sector research and news; "
          "base every statement on the data they provide, show calculations, and keep answers concise.")


def conversation(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The session so far as chat messages: the prefix every prompt of the next turn starts with."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for h in history:
        msgs.append({"role": "user", "content": h["user"]})
        msgs.append({"role": "assistant", "content": h["answer"]})
    return msgs


async def specialist_report(llm: Any, agent: str, task: str, question: str, history: list[dict[str, Any]],
                            data: Any, sources: list[str]) -> dict[str, Any]:
    """One specialist's LLM call: the conversation so far, then its task, the question and its data."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)[:DATA_CHARS]
    ask = f"[{agent} specialist] {task}\nQuestion: {question}\nData: {text}\nReport to the lead analyst."
    out = await llm.chat([*conversation(history), {"role": "user", "content": ask}],
                         max_tokens=SPECIALIST_TOKENS, ignore_eos=True)
    return {"agent": agent, "report": out["text"], "sources": sources, "llm": usage(out)}


@nalar.hints(max_concurrency=None)
class StockAnalyst(nalar.Agent):
    """Prices and fundamentals of the companies in question."""

    market = nalar.stub(MarketData)
    llm = nalar.stub(AnalystLLM)

    async def analyze(self, question: str, tickers: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        data = await nalar.gather([self.market.quote(t) for t in tickers] +
                                  [self.market.fundamentals(t) for t in tickers]) if tickers else []
        return await specialist_report(self.llm, "stock", "Analyse valuation, growth and margins.",
                                       question, history, data, [f"quote:{t}" for t in tickers])


@nalar.hints(max_concurrency=None)
class BondAnalyst(nalar.Agent):
    """Treasury curve, credit spreads at the companies' ratings, and their debt."""

    market = nalar.stub(MarketData)
    llm = nalar.stub(AnalystLLM)

    async def analyze(self, question: str, tickers: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        funds = await nalar.gather([self.market.fundamentals(t) for t in tickers]) if tickers else []
        ratings = sorted({f["credit_rating"] for f in funds})
        curve = await self.market.yields(ratings or None)
        debt = [{k: f[k] for k in ("ticker", "total_debt_musd", "cash_musd", "net_debt_musd", "credit_rating")}
                for f in funds]
        return await specialist_report(self.llm, "bond", "Assess rates, credit spreads and refinancing risk.",
                                       question, history, {"yields": curve, "debt": debt}, ["yields"])


@nalar.hints(max_concurrency=None)
class MarketResearcher(nalar.Agent):
    """Sector outlooks relevant to the question."""

    market = nalar.stub(MarketData)
    llm = nalar.stub(AnalystLLM)

    async def analyze(self, question: str, tickers: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        sectors = " ".join(finance_corpus()["companies"][t]["sector"] for t in tickers)
        notes = await self.market.research(f"{question} {sectors}", 2)
        return await specialist_report(self.llm, "research", "Summarise the sector outlook that matters here.",
                                       question, history, [n["text"] for n in notes], [n["id"] for n in notes])


@nalar.hints(max_concurrency=None)
class NewsAnalyst(nalar.Agent):
    """Recent news about the companies and the market."""

    market = nalar.stub(MarketData)
    llm = nalar.stub(AnalystLLM)

    async def analyze(self, question: str, tickers: list[str], history: list[dict[str, Any]]) -> dict[str, Any]:
        names = " ".join(finance_corpus()["companies"][t]["name"] for t in tickers)
        items = await self.market.news(f"{question} {names}", 4)
        return await specialist_report(self.llm, "news", "Report the news that bears on the question.",
                                       question, history, [{"date": n["date"], "title": n["title"], "text": n["text"]}
                                                           for n in items], [n["id"] for n in items])


@nalar.hints(stateful=True, max_concurrency=None)
class Analyst(nalar.Agent):
    """The entry point: one call per turn, the conversation in managed state."""

    market = nalar.stub(MarketData)
    stock = nalar.stub(StockAnalyst)
    bonds = nalar.stub(BondAnalyst)
    research = nalar.stub(MarketResearcher)
    news = nalar.stub(NewsAnalyst)
    llm = nalar.stub(AnalystLLM)

    async def ask(self, question: str) -> dict[str, Any]:
        history = nalar.managed_list("history")  # [{"question", "user", "answer"}], one per earlier turn
        focus = nalar.managed_value("focus", [])  # the companies the conversation is about
        past = [dict(h) for h in history]
        named = await self.market.tickers(question)
        tickers = (named + [t for t in focus.value if t not in named])[:MAX_TICKERS]
        reports = await nalar.gather(self.stock.analyze(question, tickers, past),
                                     self.bonds.analyze(question, tickers, past),
                                     self.research.analyze(question, tickers, past),
                                     self.news.analyze(question, tickers, past))
        user = question + "\n\n" + "\n\n".join(f"[{r['agent']} report] {r['report']}" for r in reports)
        out = await self.llm.chat([*conversation(past), {"role": "user", "content": user}],
                                  max_tokens=SUMMARY_TOKENS, ignore_eos=True)
        history.append({"question": question, "user": user, "answer": out["text"]})
        focus.value = tickers
        return {"session": nalar.session(), "turn": len(history), "question": question, "tickers": tickers,
                "prior_questions": [h["question"] for h in past], "answer": out["text"],
                "reports": [{"agent": r["agent"], "sources": r["sources"], "llm": r["llm"]} for r in reports],
                "summary": usage(out), "llm_calls": len(reports) + 1}


# -- load ----------------------------------------------------------------------------------------------

FIRST_QUESTIONS = (
    "What was the percentage change in {name}'s revenue from {y1} to {y2}, and what drove it?",
    "What was {name}'s ({ticker}) net margin in {y2}, and how does it compare with {y1}?",
    "Is {name} ({ticker}) expensive at its current price-to-earnings ratio relative to the {sector} sector?",
    "Given current Treasury yields, is {name}'s dividend yield attractive, and how safe is the payout?",
    "How exposed is {name} to refinancing its debt at today's rates, given its {rating} credit rating?",
    "What do recent news and the {sector} outlook imply for {name} ({ticker}) over the next year?",
    "By how much did {name}'s net income change between {y1} and {y2}, in millions and in percent?",
)
FOLLOW_UPS = (
    "How does that compare with {other}?",
    "What does the latest news say about it?",
    "What would a 50 basis point rise in the 10-year Treasury yield mean for that?",
    "Can you break that down by year from 2021 to 2023?",
    "Which risks should I watch over the next two quarters?",
    "Would you rather own its bonds or its shares, and why?",
    "And relative to {other}, which balance sheet is stronger?",
    "Summarise your view in three bullet points.",
)
_YEARS = (("2021", "2022"), ("2022", "2023"), ("2021", "2023"))


def turns_in_session(rng: random.Random) -> int:
    """Geometric with mean ``MEAN_TURNS``, at least 1, at most ``MAX_TURNS``."""
    p, n = 1.0 / max(1.0, MEAN_TURNS), 1
    while n < MAX_TURNS and rng.random() > p:
        n += 1
    return n


def think_time(rng: random.Random) -> float:
    return round(min(THINK_MAX_S, rng.lognormvariate(math.log(THINK_MEDIAN_S), THINK_SIGMA)), 3)


def sessions(rng: random.Random, rps: float, duration: float) -> Iterator[tuple[float, Session]]:
    companies = sorted(finance_corpus()["companies"].values(), key=lambda c: c["ticker"])
    for i, t in enumerate(poisson_arrivals(rng, rps, duration)):
        c = rng.choice(companies)
        y1, y2 = rng.choice(_YEARS)
        first = rng.choice(FIRST_QUESTIONS).format(name=c["name"], ticker=c["ticker"], sector=c["sector"],
                                                   rating=c["credit_rating"], y1=y1, y2=y2)
        turns = [Turn([first])]
        for _ in range(turns_in_session(rng) - 1):
            other = rng.choice([o for o in companies if o is not c])
            turns.append(Turn([rng.choice(FOLLOW_UPS).format(other=other["name"])], think_s=think_time(rng)))
        yield t, Session(f"analyst-{i:05d}", turns)


_M = "nalar.workloads.analyst"
NODE = [f"{_M}:Analyst=1", f"{_M}:StockAnalyst=1", f"{_M}:BondAnalyst=1", f"{_M}:MarketResearcher=1",
        f"{_M}:NewsAnalyst=1", "nalar.workloads.tools:MarketData=1", "nalar.workloads.models:AnalystLLM=2"]

WORKLOAD = WorkloadSpec(
    name="analyst",
    summary="financial analyst: 4 concurrent specialists + a summary per turn on one shared LLM pool; "
            "multi-turn sessions with think time and the conversation in managed state",
    entry="Analyst.ask",
    nodes=[list(NODE), list(NODE)],
    policies=("balance", "affinity"),
    sessions=sessions,
    default_rps=2.0,
    default_duration=120.0,
    timeout_s=600.0,
)
