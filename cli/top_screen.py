"""``nalar top``'s layout: a ``Frame`` (``cli/top_model.py``) as lines that each fit the terminal's width.

Every line is cut to the width here, never wrapped: a terminal of 80 columns drops the columns that
matter least (and shortens names with an ellipsis) rather than folding rows into one another. When
the frame is taller than the screen, the instance rows go first, then the bottom is cut with a line
that says how much is hidden. Glyphs fall back to ASCII where the output's encoding is not UTF-8.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence, Union

from rich.cells import cell_len, set_cell_size
from rich.text import Text

from ..bus.envelope import CONTROL_CHARS
from .top_model import ActorRow, Frame, Leader

Cell = Union[str, tuple[str, str]]  # text, or (text, style)


@dataclass(frozen=True)
class Glyphs:
    dash: str  # a value nobody reports
    more: str  # the end of a cut name
    sep: str  # between items on one line

    @staticmethod
    def for_encoding(encoding: str) -> "Glyphs":
        if encoding.lower().replace("-", "").startswith("utf"):
            return Glyphs("–", "…", " · ")
        return Glyphs("-", "~", " | ")


@dataclass(frozen=True)
class Col:
    head: str
    width: int  # the first column's is its least width: it takes what the others leave
    left: bool = False
    drop: int = 0  # 0: kept at any width; otherwise the highest goes first when the row is too wide
    cosmetic: bool = False  # dropped too, before a name in the first column is cut


def printable(text: str) -> str:
    """``text`` with every control character shown as ``?``: names and ids come from the bus, and a
    forged status could carry escape sequences (clear the screen, write the clipboard) to the terminal."""
    return CONTROL_CHARS.sub("?", text)


def fit(text: str, width: int, g: Glyphs, left: bool = True) -> str:
    """``text`` in exactly ``width`` cells (control characters shown as ``?``): padded, or cut with an ellipsis."""
    text = printable(text)
    if width <= 0:
        return ""
    if cell_len(text) > width:
        text = set_cell_size(text, width - 1) + g.more if width > 1 else set_cell_size(text, width)
    pad = " " * (width - cell_len(text))
    return text + pad if left else pad + text


def table(cols: Sequence[Col], rows: Sequence[tuple[Sequence[Cell], str]], width: int, g: Glyphs) -> list[Text]:
    """A header and rows (cells, row style) in ``width`` columns, dropping columns that do not fit."""
    keep = list(range(len(cols)))

    def rest(ks: list[int]) -> int:
        return sum(cols[k].width + 1 for k in ks[1:])

    while rest(keep) + cols[0].width > width and any(cols[k].drop for k in keep):
        keep.remove(max(keep, key=lambda k: cols[k].drop))
    natural = max([cell_len(cols[0].head)] + [cell_len(_text(r[0][0])) for r in rows])
    while rest(keep) + natural > width and any(cols[k].cosmetic for k in keep):
        keep.remove(next(k for k in keep if cols[k].cosmetic))
    first = max(cols[0].width, min(natural, width - rest(keep)))
    widths = {k: (first if k == 0 else cols[k].width) for k in keep}
    out = [_row([c.head for c in cols], keep, widths, cols, "bold", g, width)]
    out += [_row(cells, keep, widths, cols, style, g, width) for cells, style in rows]
    return out


def _text(c: Cell) -> str:
    return c if isinstance(c, str) else c[0]


def _row(cells: Sequence[Cell], keep: list[int], widths: dict[int, int], cols: Sequence[Col], style: str,
         g: Glyphs, width: int) -> Text:
    line = Text(style=style, no_wrap=True, overflow="crop")
    for n, k in enumerate(keep):
        if n:
            line.append(" ")
        c = cells[k] if k < len(cells) else ""
        line.append(fit(_text(c), widths[k], g, cols[k].left), style=c[1] if isinstance(c, tuple) else "")
    line.truncate(width)
    return line


def ms(v: float | None, g: Glyphs) -> str:
    if v is None:
        return g.dash
    if v < 10:
        return f"{v:.1f}ms"
    if v < 1000:
        return f"{v:.0f}ms"
    if v < 60_000:
        return f"{v / 1000:.1f}s"
    return f"{v / 60_000:.0f}m"


def ago(s: float | None, g: Glyphs) -> str:
    """A duration, short: 0.4s, 12s, 3m05s, 2h10m, 4d03h."""
    if s is None:
        return g.dash
    if s < 10:
        return f"{s:.1f}s"
    n = int(s)
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def _num(v: int | None, g: Glyphs) -> str:
    return g.dash if v is None else f"{v:,}" if v < 1_000_000 else f"{v / 1e6:.1f}M"


def packed(label: str, items: list[str], width: int, g: Glyphs, max_lines: int = 3) -> list[Text]:
    """``label`` then ``items`` joined on as few lines as fit (at most ``max_lines``, the rest counted)."""
    done: list[str] = []
    cur, fresh = printable(label), True
    items = [printable(i) for i in items]
    for n, item in enumerate(items):
        piece = item if fresh else g.sep + item
        if fresh or cell_len(cur + piece) <= width:
            cur, fresh = cur + piece, False
            continue
        if len(done) + 1 == max_lines:  # no room for another line: count what is left on this one
            tail = f"{g.sep}+{len(items) - n} more"
            cur = set_cell_size(cur, max(width - cell_len(tail), 0)).rstrip() + tail
            break
        done.append(cur)
        cur, fresh = "  " + item, False
    done.append(cur)
    return [Text(fit(x, width, g), no_wrap=True, overflow="crop") for x in done]


def _leader(p: Leader | None, width: int, g: Glyphs) -> list[Text]:
    if p is None:
        return [Text(fit("policy  no policy actor answers (nodes keep the decisions they have)", width, g),
                     style="yellow")]
    every = f" every {p.interval_s:g}s" if p.interval_s is not None else ""
    work = (f"round {p.rounds}{every}{g.sep}last {ms(p.last_round_ms, g)}{g.sep}errors {len(p.errors)}"
            f"{g.sep}refused {len(p.refused)}")
    if p.role == "leader":
        head, style = f"leader  {p.name} term {p.term}", "bold green"
    elif p.role == "standby":
        head, style = f"leader  none answers (lease: {p.name or 'free'})", "bold yellow"
    else:
        head, style = f"policy  {p.name} alone (no election)", "bold"
    out = [Text(fit(f"{head}{g.sep}{work}", width, g), style=style, no_wrap=True)]
    out.append(Text(fit(f"  policies {','.join(p.policies) or 'none'}{g.sep}standbys "
                        f"{', '.join(p.standbys) or 'none'}", width, g), no_wrap=True))
    if p.errors:
        k, v = list(p.errors.items())[-1]
        out.append(Text(fit(f"  error {k}: {' '.join(v.split())}", width, g), style="red", no_wrap=True))
    if p.refused:
        out.append(Text(fit(f"  refused: {' '.join(p.refused[-1].split())}", width, g), style="yellow", no_wrap=True))
    return out


NODE_COLS = (Col("NODE", 10, left=True), Col("HEALTH", 7, left=True), Col("UP", 6), Col("IN FLIGHT", 9),
             Col("SEEN", 6), Col("DECIDED", 7, drop=2), Col("TERM", 5, drop=3), Col("REFUSED", 7, drop=1))
ACTOR_COLS = (Col("ACTOR", 12, left=True), Col("NODE", 10, left=True, drop=4), Col("QUEUE", 6), Col("RUN", 7),
              Col("DONE", 7, drop=2), Col("FAIL", 5), Col("P50", 6), Col("P99", 6), Col("WAIT", 6, drop=3),
              Col("KIND", 6, left=True, drop=5, cosmetic=True))
ENGINE_COLS = (Col("ENGINE", 14, left=True), Col("KV", 5), Col("RUNNING", 7), Col("WAITING", 7),
               Col("PREFIX", 6, drop=1), Col("", 24, left=True, drop=2))
HEALTH_STYLE = {"up": "green", "stale": "yellow", "missing": "bold red"}


def _actor_rows(a: ActorRow, instances: bool, g: Glyphs) -> list[tuple[list[Cell], str]]:
    queue: Cell = (_num(a.queued, g), "bold yellow") if a.queued else "0"
    fail: Cell = (str(a.failed), "red") if a.failed else "0"
    rows: list[tuple[list[Cell], str]] = [([a.actor, a.node, queue, str(a.running), _num(a.done, g), fail,
                                           ms(a.p50_ms, g), ms(a.p99_ms, g), ms(a.wait_ms, g), a.kind],
                                          "dim" if a.stale else "")]
    if instances and not a.stale:
        for i in a.instances:
            run = f"{i.running}/{i.limit}" if i.limit is not None else str(i.running)
            name = f"  {i.id}" + (" (draining)" if i.draining else "")
            rows.append(([name, "", _num(i.queued, g), run, _num(i.handled, g), "", "", "", "", ""], "dim"))
    return rows


def lines(f: Frame, width: int, g: Glyphs, instances: bool = True, hint: str = "") -> list[Text]:
    """The whole frame, top to bottom; ``hint`` ends the title line (how often, how to quit)."""
    clock = time.strftime("%H:%M:%S", time.localtime(f.at))
    out = [Text(fit(f" nalar top{g.sep}{f.namespace} @ {f.url}{g.sep}{clock}{g.sep + hint if hint else ''}",
                    width, g), style="reverse bold", no_wrap=True)]
    if f.silent_s is not None:
        why = f": {f.note}" if f.note else ""
        out.append(Text(fit(f"no answer for {f.silent_s:.0f} s, showing what was last seen{why}", width, g),
                        style="bold red", no_wrap=True))
    elif f.note:
        out.append(Text(fit(f.note, width, g), style="yellow", no_wrap=True))
    out += _leader(f.leader, width, g)
    v = f"v{f.decisions_v}" if f.decisions_v is not None else g.dash
    out += packed(f"decisions {v}: ", f.decisions or ["none in force"], width, g)
    out.append(Text(""))
    out += table(NODE_COLS, [([n.name, (n.health, HEALTH_STYLE.get(n.health, "")), ago(n.uptime_s, g),
                               _num(n.in_flight, g), ago(n.seen_s, g), _num(n.decisions_v, g), _num(n.term, g),
                               (str(n.refused), "yellow") if n.refused else "0"], "")
                             for n in f.nodes], width, g)
    if f.actors:
        out.append(Text(""))
        rows = [r for a in f.actors for r in _actor_rows(a, instances, g)]
        out += table(ACTOR_COLS, rows, width, g)
    out.append(Text(""))
    if f.waiting is None:
        out.append(Text(fit(f"waiting longest: {g.dash}", width, g), no_wrap=True))
    else:
        out += packed("waiting longest: ", [f"{w.session} {w.actor}@{w.node} {ms(w.wait_ms, g)}" for w in f.waiting]
                      or ["nobody"], width, g, max_lines=2)
    if f.engines:
        out.append(Text(""))
        out += table(ENGINE_COLS, [([e.instance, g.dash if e.kv_usage is None else f"{100 * e.kv_usage:.0f}%",
                                     _num(e.running, g), _num(e.waiting, g),
                                     g.dash if e.prefix_hit_rate is None else f"{100 * e.prefix_hit_rate:.0f}%",
                                     (f"stats failed: {e.error}", "red") if e.error
                                     else f"sim {e.simulated}" if e.simulated else ""], "")
                                   for e in f.engines], width, g)
    return out


def screen(f: Frame, width: int, height: int, g: Glyphs, hint: str = "") -> list[Text]:
    """The frame cut to ``height`` lines: first without instance rows, then with a line for the rest."""
    height = max(height, 1)  # (a pty may say 0 rows)
    out = lines(f, width, g, True, hint)
    if len(out) > height:
        out = lines(f, width, g, False, hint)
    if len(out) > height:
        hidden = len(out) - height + 1
        out = out[:height - 1] + [Text(fit(f"{g.more} {hidden} more lines: a taller terminal shows them", width, g),
                                       style="dim", no_wrap=True)]
    return out
