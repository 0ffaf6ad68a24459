"""Tools the reference workloads call: web search, documentation retrieval, market data.

They stand for the non-LLM steps of an agent (a search API, a vector store, a market-data feed) and
answer in milliseconds from small corpora shipped in ``corpora/`` (hand-written; the companies and
figures in ``finance.jsonl`` are fictional). Ranking is BM25 in pure Python, so results are
deterministic and need no service. Every method is ``async def`` with no concurrency limit: a tool
call never queues behind another, so what the benchmarks measure is the LLMs and the scheduling.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import nalar

CORPORA = Path(__file__).resolve().parent / "corpora"

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its of on or that the this to "
    "was what when where which who why will with you your".split())


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words, stop words dropped, a plural ``s`` folded (cheap stemming)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOP:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


class BM25:
    """Okapi BM25 over a fixed list of texts (k1=1.5, b=0.75)."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(t)) for t in texts]
        self.lens = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lens) / max(1, len(self.lens))
        df: Counter[str] = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` best (index, score) pairs, best first; ties keep corpus order. Only positive scores."""
        terms = [w for w in set(tokenize(query)) if w in self.idf]
        scores: list[tuple[float, int]] = []
        for i, d in enumerate(self.docs):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg)
            for w in terms:
                tf = d.get(w, 0)
                if tf:
                    s += self.idf[w] * tf * (self.k1 + 1) / (tf + norm)
            if s > 0:
                scores.append((-s, i))
        scores.sort()
        return [(i, -s) for s, i in scores[:max(0, k)]]


def _jsonl(name: str) -> list[dict[str, Any]]:
    with open(CORPORA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=1)
def web_corpus() -> tuple[list[dict[str, Any]], BM25]:
    docs = _jsonl("web.jsonl")
    return docs, BM25([f"{d['title']} {d['title']} {d['text']}" for d in docs])


@lru_cache(maxsize=1)
def doc_passages() -> tuple[list[dict[str, str]], BM25]:
    """Every ``## section`` of every ``docs/*.md`` file is one passage, titled by file and heading."""
    passages: list[dict[str, str]] = []
    for path in sorted((CORPORA / "docs").glob("*.md")):
        title = ""
        sections: list[tuple[str, list[str]]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                title = line[2:].strip()
            elif line.startswith("## "):
                sections.append((line[3:].strip(), []))
            elif line.strip() and sections:
                sections[-1][1].append(line.strip())
        passages += [{"source": path.name, "title": title, "heading": h, "text": " ".join(ls)}
                     for h, ls in sections if ls]
    return passages, BM25([f"{p['title']} {p['heading']} {p['heading']} {p['text']}" for p in passages])


@lru_cache(maxsize=1)
def finance_corpus() -> dict[str, Any]:
    """Companies by ticker, the yield table, and BM25 indexes over research notes and news."""
    rows = _jsonl("finance.jsonl")
    companies = {r["ticker"]: r for r in rows if r["kind"] == "company"}
    research = [r for r in rows if r["kind"] == "research"]
    news = [r for r in rows if r["kind"] == "news"]
    names = {r["ticker"]: r["name"] for r in companies.values()}
    return {
        "companies": companies,
        "yields": next(r for r in rows if r["kind"] == "yields"),
        "research": research,
        "research_index": BM25([f"{r['sector']} {r['title']} {r['text']}" for r in research]),
        "news": news,
        "news_index": BM25([f"{r['title']} {r['text']} {names.get(r['ticker'], '')}" for r in news]),
    }


def find_tickers(text: str) -> list[str]:
    """Tickers of the companies ``text`` names (by ticker, full name or alias), in order of mention."""
    companies = finance_corpus()["companies"]
    low = text.lower()
    hits: list[tuple[int, str]] = []
    for t, c in companies.items():
        pos = [m.start() for m in re.finditer(rf"\b{t}\b", text)]
        for alias in [c["name"].lower(), *c["aliases"]]:
            pos += [m.start() for m in re.finditer(rf"\b{re.escape(alias)}\b", low)]
        if pos:
            hits.append((min(pos), t))
    return [t for _, t in sorted(hits)]


def _growth(series: dict[str, float]) -> dict[str, float]:
    ys = sorted(series)
    return {f"{a}-{b}": round(100 * (series[b] - series[a]) / abs(series[a]), 2)
            for a, b in zip(ys, ys[1:]) if series[a]}


@nalar.hints(max_concurrency=None)
class WebSearch(nalar.Tool):
    """Ranked web search over ``corpora/web.jsonl`` (a stand-in for a search API)."""

    async def search(self, query: str, k: int = 5) -> list[dict[str, Any]]:
        docs, index = web_corpus()
        return [{"id": docs[i]["id"], "title": docs[i]["title"], "url": docs[i]["url"],
                 "snippet": docs[i]["text"], "score": round(s, 4)} for i, s in index.search(query, k)]


@nalar.hints(max_concurrency=None)
class DocRetrieval(nalar.Tool):
    """Top-k passages of library documentation (``corpora/docs/*.md``): a stand-in for a vector store."""

    async def retrieve(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        passages, index = doc_passages()
        return [{**passages[i], "score": round(s, 4)} for i, s in index.search(query, k)]


@nalar.hints(max_concurrency=None)
class MarketData(nalar.Tool):
    """Quotes, fundamentals, yields, sector research and news over ``corpora/finance.jsonl``
    (fictional companies and sample figures): what the analyst's specialists look up."""

    async def tickers(self, text: str) -> list[str]:
        return find_tickers(text)

    async def quote(self, ticker: str) -> dict[str, Any]:
        c = self._company(ticker)
        chg = round(c["price"] - c["prev_close"], 2)
        return {"ticker": c["ticker"], "name": c["name"], "price": c["price"], "change": chg,
                "change_pct": round(100 * chg / c["prev_close"], 2),
                "week52_low": c["week52_low"], "week52_high": c["week52_high"]}

    async def fundamentals(self, ticker: str) -> dict[str, Any]:
        c = self._company(ticker)
        rev, ni = c["revenue_musd"], c["net_income_musd"]
        last = max(rev)
        eps = ni[last] / c["shares_m"]
        return {"ticker": c["ticker"], "name": c["name"], "sector": c["sector"],
                "revenue_musd": rev, "net_income_musd": ni, "revenue_growth_pct": _growth(rev),
                "net_margin_pct": {y: round(100 * ni[y] / rev[y], 2) for y in rev},
                "eps": round(eps, 2), "pe": round(c["price"] / eps, 1) if eps > 0 else None,
                "dividend_yield_pct": round(100 * c["dividend_per_share"] / c["price"], 2),
                "total_debt_musd": c["total_debt_musd"], "cash_musd": c["cash_musd"],
                "net_debt_musd": c["total_debt_musd"] - c["cash_musd"], "credit_rating": c["credit_rating"]}

    async def yields(self, ratings: list[str] | None = None) -> dict[str, Any]:
        y = finance_corpus()["yields"]
        spreads = y["corporate_spread_pct"]
        want = [r for r in (ratings or list(spreads)) if r in spreads]
        ten = y["treasury_pct"]["10Y"]
        return {"as_of": y["as_of"], "treasury_pct": y["treasury_pct"],
                "treasury_10y_history_pct": y["treasury_10y_history_pct"],
                "corporate_yield_10y_pct": {r: round(ten + spreads[r], 2) for r in want},
                "corporate_spread_pct": {r: spreads[r] for r in want}}

    async def research(self, query: str, k: int = 2) -> list[dict[str, Any]]:
        f = finance_corpus()
        return [{**f["research"][i], "score": round(s, 4)} for i, s in f["research_index"].search(query, k)]

    async def news(self, query: str, k: int = 4) -> list[dict[str, Any]]:
        f = finance_corpus()
        return [{**f["news"][i], "score": round(s, 4)} for i, s in f["news_index"].search(query, k)]

    def _company(self, ticker: str) -> dict[str, Any]:
        c = finance_corpus()["companies"].get(ticker.upper())
        if c is None:
            raise KeyError(f"unknown ticker {ticker!r}")
        return c
