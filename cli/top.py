"""``nalar top``: the deployment, live, in a terminal: ``cli/top_model.py`` gathers, ``cli/top_screen.py``
lays out, this file runs the screen.

Made for a plain terminal over SSH: no mouse, keys read in cbreak mode (``q`` quits; Ctrl-C too), the
alternate screen so the shell's scrollback is left as it was, and the terminal restored on any way out
(``q``, Ctrl-C, SIGTERM, a hang-up, an error). Where the output is not a terminal that can move its
cursor (a pipe, ``TERM=dumb``), each frame is printed after the last instead, without colour. Log
lines (the NATS client's "disconnected, reconnecting") would scribble over the screen, so while it
runs they are caught and the last one is shown in the frame.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import termios
import time
import tty
from typing import TYPE_CHECKING, Any, Iterator

from . import exits
from .connect import cli_client
from .top_model import Frame, Watch

if TYPE_CHECKING:  # rich is imported when top runs, not by every command's parser
    from .top_screen import Glyphs

LOGGERS = ("nalar", "nats")


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from .args import GLOBALS

    p = sub.add_parser("top", help="a live view of the deployment: nodes, queues, latencies, decisions, "
                                   "the policy leader, engines",
                       description="Refresh a view of the deployment every --interval seconds, from the status "
                                   "requests `nalar status` makes (as the operator): nodes and their health, "
                                   "actors and instances (queue, running, done/failed, run-time p50/p99, median "
                                   "queue wait), the sessions waiting longest, the decisions in force, the "
                                   "policy leader, model engines. q or Ctrl-C quits.")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default: 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for the first answers, connecting included (default: 2); later "
                        "rounds wait at most one interval")
    p.add_argument("--nats", metavar="URL", default=None, help=GLOBALS["nats"][1])
    p.add_argument("--namespace", metavar="NS", default=None, help=GLOBALS["namespace"][1])


def run(a: argparse.Namespace) -> int:
    if a.interval <= 0:
        print("nalar: --interval must be > 0", file=sys.stderr)
        return exits.USAGE
    return asyncio.run(_top(a))


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _resize(console: Any) -> tuple[int, int]:
    """The terminal's size now: asked of the terminal itself, since a ``COLUMNS`` left in the environment
    (which rich would believe) is stale once the window is resized. Not a terminal: rich's guess."""
    with contextlib.suppress(OSError, ValueError):
        size = os.get_terminal_size(sys.stdout.fileno())
        console.size = (size.columns, size.lines)
    return console.width, console.height


async def _top(a: argparse.Namespace) -> int:
    from .top_screen import Glyphs, lines

    started = time.monotonic()
    client = await cli_client(a, "operator")
    try:
        watch = Watch(client, client.runtime.subjects.ns)
        frame = await watch.round(max(a.timeout - (time.monotonic() - started), 0.001))
        if frame.silent_s is not None:
            why = f" ({frame.note})" if frame.note else ""
            print(f"nalar: no node or policy actor answered at {client.url} (namespace {watch.namespace!r}) "
                  f"within {a.timeout:g} s{why}", file=sys.stderr)
            return exits.REMOTE
        console = _console()
        g = Glyphs.for_encoding(console.encoding)
        if a.once:
            _plain(console, lines(frame, _resize(console)[0], g))
            return exits.OK
        with _caught_logs(watch):
            return await _loop(a, watch, frame, console, g)
    finally:
        await client.aclose()


async def _loop(a: argparse.Namespace, watch: Watch, frame: Frame, console: Any, g: Glyphs) -> int:
    """Rounds and redraws until a key, a signal or a hang-up says stop; the exit status."""
    from .top_screen import lines, screen

    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    why: list[int] = []  # the exit status, once something asks to stop

    def stop(code: int) -> None:
        why.append(code)
        wake.set()

    for sig, code in ((signal.SIGINT, exits.INTERRUPTED), (signal.SIGTERM, 128 + signal.SIGTERM),
                      (signal.SIGHUP, 128 + signal.SIGHUP)):
        loop.add_signal_handler(sig, stop, code)
    loop.add_signal_handler(signal.SIGWINCH, wake.set)
    live = console.is_terminal and not console.is_dumb_terminal
    tick: asyncio.Future[Any] | None = None
    shown: Frame | None = None
    hint = f"every {a.interval:g}s{g.sep}q quits"
    try:
        with _keys(loop, lambda: stop(exits.OK), wake), _screen(console, live) as show:
            while not why:
                width, height = _resize(console)
                if live:  # a key or a resize redraws the same frame; printed frames are printed once
                    show(screen(frame, width, height, g, hint))
                elif frame is not shown:
                    show(lines(frame, width, g, True, hint))
                shown = frame
                if tick is None:
                    tick = asyncio.gather(watch.round(min(a.timeout, max(a.interval, 0.5))), asyncio.sleep(a.interval))
                wake.clear()
                waiter = asyncio.ensure_future(wake.wait())
                await asyncio.wait({tick, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if tick.done() and not why:
                    frame, tick = tick.result()[0], None
    finally:
        if tick is not None:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
    return why[0]


def _plain(console: Any, out: list[Any]) -> None:
    """Lines printed as they are, less the padding at their ends (for a pipe, a file, a README)."""
    for line in out:
        line.rstrip()
        console.print(line)


@contextlib.contextmanager
def _screen(console: Any, live: bool) -> Iterator[Any]:
    """``show(lines)``: a redraw on the alternate screen, or (no cursor to move) a frame printed after the last."""
    from rich.console import Group
    from rich.live import Live

    if not live:
        def append(out: list[Any]) -> None:
            _plain(console, out)
            console.print()
        yield append
        return
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as view:
        yield lambda out: view.update(Group(*out), refresh=True)


@contextlib.contextmanager
def _keys(loop: asyncio.AbstractEventLoop, quit: Any, wake: asyncio.Event) -> Iterator[None]:
    """Keys as they are typed (cbreak: no Enter needed, Ctrl-C still a signal); the terminal's mode restored."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)

    def on_key() -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data or b"q" in data.lower() or b"\x03" in data:  # end of input counts as a quit
            quit()
        else:
            wake.set()  # any other key: redraw now

    tty.setcbreak(fd)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _LastLog(logging.Handler):
    """Keeps the last log line for the frame instead of printing it over the screen."""

    def __init__(self, watch: Watch) -> None:
        super().__init__(logging.WARNING)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.watch.note = f"{time.strftime('%H:%M:%S')} {record.getMessage()}"
            self.watch.noted = time.monotonic()


@contextlib.contextmanager
def _caught_logs(watch: Watch) -> Iterator[None]:
    handler = _LastLog(watch)
    saved = []
    for name in LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, list(lg.handlers)))
        lg.handlers = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        for lg, propagate, handlers in saved:
            lg.handlers = handlers
            lg.propagate = propagate
