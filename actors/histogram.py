"""A fixed-bucket latency histogram cheap enough for every call, with a window of the last seconds.

A node runs tens of thousands of calls a second, and ``prometheus_client.Histogram.observe`` takes a
lock and walks its buckets in Python: two of them per call (queue wait and run time) would cost a
measurable share of a node's throughput. This one is a ``bisect`` into a short sorted tuple and three
increments, all on the thread that owns it (the node's loop); nothing is locked, so it is
read on that thread too (``actors/prometheus.py`` serves ``/metrics`` from the loop).

It keeps two rotating windows of ``period`` seconds each, the current one and the one before, so
``recent()`` covers between one and two periods (5 to 10 s by default) and ``nalar top`` shows p50
and p99 of what happened lately, not since the node started; a window that ages out is added to the
older counts, so the all-time counts (Prometheus's cumulative buckets, built at scrape time) are the
three together and an observation touches one list only.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import NamedTuple

#: Bucket upper bounds in milliseconds (a 1-2-5 series from 50 us to 5 min; above: the +Inf bucket).
BOUNDS_MS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000,
                                10_000, 20_000, 60_000, 300_000)
#: Seconds each of the two recent windows covers.
PERIOD_S = 5.0


class Recent(NamedTuple):
    """A summary of the recent window, as ``status()`` reports it (milliseconds)."""

    p50: float | None
    p99: float | None
    n: int
    window_s: float

    def to_dict(self) -> dict[str, float | int | None]:
        return {"p50": self.p50, "p99": self.p99, "n": self.n, "window_s": self.window_s}


class Histogram:
    """Counts of observations (milliseconds) per fixed bucket: all time, and over the last seconds."""

    __slots__ = ("bounds", "older", "sum", "cur", "prev", "period", "cur_start", "rotate_at", "born")

    def __init__(self, bounds: tuple[float, ...] = BOUNDS_MS, period: float = PERIOD_S,
                 now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.bounds = bounds
        self.older = [0] * (len(bounds) + 1)  # before the two windows; the last: over the largest bound (+Inf)
        self.sum = 0.0
        self.cur = [0] * (len(bounds) + 1)  # the window that started at ``cur_start``
        self.prev = [0] * (len(bounds) + 1)  # the one before it
        self.period = period
        self.cur_start = now
        self.rotate_at = now + period
        self.born = now

    def observe(self, ms: float, now: float) -> None:
        """One observation; ``now`` is ``time.monotonic()``, which the caller has at hand."""
        if now >= self.rotate_at:
            self.rotate(now)
        self.cur[bisect_left(self.bounds, ms)] += 1
        self.sum += ms

    def rotate(self, now: float) -> None:
        """Move the windows on to ``now`` (aligned to whole periods; a long idle empties both)."""
        if now < self.rotate_at:
            return
        steps = int((now - self.cur_start) // self.period)
        n = len(self.cur)
        aged = (self.prev,) if steps == 1 else (self.prev, self.cur)
        self.older = [sum(x) for x in zip(self.older, *aged)]
        self.prev = self.cur if steps == 1 else [0] * n
        self.cur = [0] * n
        self.cur_start += steps * self.period
        self.rotate_at = self.cur_start + self.period

    @property
    def counts(self) -> list[int]:
        """All-time counts per bucket (+Inf last)."""
        return [a + b + c for a, b, c in zip(self.older, self.prev, self.cur)]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """Prometheus's buckets: (upper bound in ms, observations at or under it), +Inf last."""
        out, acc = [], 0
        for b, c in zip(self.bounds + (float("inf"),), self.counts):
            acc += c
            out.append((b, acc))
        return out

    def recent(self, now: float | None = None) -> Recent:
        """p50, p99 and count over the current and the previous window, and how long that is."""
        now = time.monotonic() if now is None else now
        self.rotate(now)
        merged = [a + b for a, b in zip(self.prev, self.cur)]
        n = sum(merged)
        window = round(min(now - self.cur_start + self.period, now - self.born), 3)
        return Recent(quantile(self.bounds, merged, 0.5), quantile(self.bounds, merged, 0.99), n, window)


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucketed counts, interpolated linearly inside its bucket (as PromQL's
    ``histogram_quantile`` does); in the +Inf bucket, the largest bound. ``None`` with no observation."""
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    acc = 0
    for i, c in enumerate(counts):
        if c and acc + c >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            lo = bounds[i - 1] if i > 0 else 0.0
            return round(lo + (bounds[i] - lo) * (rank - acc) / c, 3)
        acc += c
    return float(bounds[-1])
