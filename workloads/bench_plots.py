"""PNG plots of ``nalar bench WORKLOAD`` results: latency CDF, latency over the run, latency vs rate.

matplotlib is optional (``pip install 'nalar[bench]'``); without it the JSON is still written.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def plot(name: str, raw: dict[tuple[float, str], Any], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'nalar[bench]'): no plots", file=sys.stderr)
        return []
    engine = rows[0]["engine"] if rows else ""
    tag = f" ({engine}{', a simulation' if rows and rows[0]['simulated'] else ''})"
    written = []
    last = rows[-1]["rps"] if rows else 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (rps, config), res in sorted(raw.items()):
        if rps != last:
            continue
        lat = sorted(r.latency_ms / 1000 for r in res.records if r.latency_ms is not None)
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=config)
    ax.set_xlabel("turn latency (s)")
    ax.set_ylabel("fraction of turns")
    ax.set_title(f"{name} @ {last:g} rps: latency CDF{tag}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (rps, config), res in sorted(raw.items()):
        if rps != last:
            continue
        pts = sorted((r.arrival, r.latency_ms / 1000) for r in res.records if r.latency_ms is not None)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, alpha=0.5, label=config)
    ax.set_xlabel("sent at (s into the run)")
    ax.set_ylabel("turn latency (s)")
    ax.set_title(f"{name} @ {last:g} rps: latency over the run{tag}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "latency_over_time.png"))

    if len(rows) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        configs = sorted({c for (_, c) in raw})
        for config in configs:
            xs = [row["rps"] for row in rows if config in row]
            for key, style in (("p50_ms", ":"), ("p95_ms", "--"), ("p99_ms", "-")):
                ax.plot(xs, [row[config][key] / 1000 for row in rows if config in row], style, marker="o",
                        label=f"{config} {key[:3]}")
        ax.set_xlabel("request rate (new sessions/s)")
        ax.set_ylabel("turn latency (s)")
        ax.set_title(f"{name}: latency vs rate{tag}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "latency_vs_rate.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
