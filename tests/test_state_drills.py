"""The acceptance drills of issue 12, "session state that cannot fork or vanish", with real processes.

Every drill drives closed-loop callers (two per session, on two client connections) that append unique
tokens ``<session>:<caller>:<i>`` to a ``Ledger`` session list (tests/sample_actors.py) for
``NALAR_DRILL_SECONDS`` (default 20) while the calls of one session land on every node at once (the
actor's NATS queue group spreads them). Then it reads every session back (a ``tokens()`` call, the
``state show`` and ``state log`` views, and each node's own copy) and measures, exactly:

* lost: an acknowledged append (it returned) whose token is not in the final list;
* doubled: a token present more than once (or a future id committed twice in the log);
* failed-but-applied: a call that raised a definite error, yet its token is present (an error whose
  message says the outcome is *unknown* may have applied: those are counted apart and allowed);
* misplaced: an acknowledged append whose token is not at the position it returned (two lineages);
* hung: a call still unresolved ``HANG_GRACE`` seconds after its own deadline, or a caller that never
  finished;
* version gaps: the log's versions must be consecutive and end at the list's length; a node's copy
  that is not a prefix of the final list is a fork.

The drills: the fork drill (3 and 4 nodes, one server), the crash drill (SIGKILLs with restarts, one
node gone for good, one back on an empty state dir under its old name) and the cluster drill (3
clustered nats-servers, the state stream's leader SIGKILLed mid-load, then restarted).
``NALAR_DRILL_SEED`` fixes the crash drill's choice of victims (the seed is printed either way).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import nalar
from conftest import NodeProc, node_env

ACTOR = "Ledger"
SPEC = "sample_actors:Ledger"
DRILL_SECONDS = float(os.environ.get("NALAR_DRILL_SECONDS", "20"))
CHAOS_SECONDS = DRILL_SECONDS * 1.25  # the crash and cluster drills: ~25 s by default
CALL_TIMEOUT = 30.0  # every call's deadline (options(timeout=...))
HANG_GRACE = 15.0  # a call unresolved this long past its deadline is hung
READ_TIMEOUT = 30.0  # each read of the verification phase
MAX_CALLS_PER_CALLER = 100_000
FAILURE_PAUSE = 0.05  # a caller's pause after a failed call, so an outage is not a busy loop
DETAIL_SESSIONS = 8  # sessions detailed in a failure message
DETAIL_TOKENS = 6

_BUDGET = int(CHAOS_SECONDS + CALL_TIMEOUT + HANG_GRACE + 4 * READ_TIMEOUT + 120)


# -- the load ----------------------------------------------------------------------------------------
@dataclass
class Call:
    session: str
    caller: int
    i: int
    token: str
    started: float
    outcome: str = "pending"  # ok | unknown | failed | hung | pending (its caller was cancelled)
    value: Any = None  # what append returned: the list's length after it
    error: str = ""
    error_type: str = ""
    fid: str = ""
    ended: float = 0.0


@dataclass
class Drill:
    name: str
    t0: float = field(default_factory=time.monotonic)
    calls: list[Call] = field(default_factory=list)
    acked: int = 0
    callers: int = 0
    callers_finished: int = 0
    unfinished_callers: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # harness-level failures found along the way
    _waiters: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        self.events.append(f"{self.now():6.2f}s {text}")

    def ack(self) -> None:
        self.acked += 1
        for n, ev in self._waiters:
            if self.acked >= n:
                ev.set()

    async def until_acked(self, n: int, timeout: float) -> None:
        """Until ``n`` calls were acknowledged in all (an event, not a poll)."""
        if self.acked >= n:
            return
        ev = asyncio.Event()
        self._waiters.append((n, ev))
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name}: only {self.acked} of {n} calls were acknowledged within "
                                 f"{timeout:g} s of load; the deployment is not serving") from None
        finally:
            self._waiters.remove((n, ev))


async def _await(fut: Any) -> Any:
    return await fut


def _unknown_outcome(e: BaseException) -> bool:
    """The one failure allowed to have applied: an error that says its outcome is unknown."""
    return "unknown" in str(getattr(e, "message", None) or e).lower()


async def _caller(drill: Drill, stub: Any, session: str, caller: int, stop_at: float) -> None:
    for i in range(MAX_CALLS_PER_CALLER):
        if time.monotonic() >= stop_at:
            return
        c = Call(session, caller, i, f"{session}:{caller}:{i}", drill.now())
        drill.calls.append(c)
        try:
            fut = stub.append(c.token)
            c.fid = str(getattr(fut, "id", ""))
            c.value = await asyncio.wait_for(_await(fut), CALL_TIMEOUT + HANG_GRACE)
            c.outcome = "ok"
            drill.ack()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # every failure is recorded and classified, none ends the caller
            c.error_type = type(e).__name__
            c.error = str(getattr(e, "message", None) or e)[:300]
            if isinstance(e, TimeoutError) and not isinstance(e, nalar.NalarError):
                c.outcome = "hung"  # our guard fired: the future never resolved
                c.error = f"unresolved {CALL_TIMEOUT + HANG_GRACE:g} s after it was sent"
            elif _unknown_outcome(e):
                c.outcome = "unknown"
            else:
                c.outcome = "failed"
        finally:
            c.ended = drill.now()
        if c.outcome != "ok":
            await asyncio.sleep(FAILURE_PAUSE)


async def drive(drill: Drill, url: str, namespace: str, sessions: list[str], seconds: float,
                chaos: Any = None, callers_per_session: int = 2) -> list[Any]:
    """Run the load (and ``chaos(drill)`` beside it) for ``seconds``; the connected clients, still open.

    Returns once every caller finished (bounded: a caller still running ``CALL_TIMEOUT + HANG_GRACE``
    after the end is cancelled and counted as unfinished) and the chaos schedule ended.
    """
    clients: list[Any] = []
    try:
        for k in range(callers_per_session):
            clients.append(await nalar.connect_async(url, namespace, name=f"drill-caller-{k}"))
        await _load(drill, clients, sessions, seconds, chaos, callers_per_session)
    except BaseException:
        await _close(clients)
        raise
    return clients


async def _load(drill: Drill, clients: list[Any], sessions: list[str], seconds: float, chaos: Any,
                callers_per_session: int) -> None:
    stubs = [c.stub(ACTOR).options(timeout=CALL_TIMEOUT) for c in clients]
    drill.t0 = time.monotonic()
    stop_at = drill.t0 + seconds
    names: dict[asyncio.Task[None], str] = {}
    for s in sessions:
        for k in range(callers_per_session):
            t = asyncio.create_task(_caller(drill, stubs[k].options(session=s), s, k, stop_at))
            names[t] = f"{s}/caller{k}"
    drill.callers = len(names)
    chaos_task = asyncio.create_task(chaos(drill)) if chaos is not None else None
    done, pending = await asyncio.wait(list(names), timeout=seconds + CALL_TIMEOUT + HANG_GRACE + 10)
    drill.callers_finished = len(done)
    for t in pending:
        drill.unfinished_callers.append(names[t])
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for t in done:
        if t.exception() is not None:
            drill.problems.append(f"caller {names[t]} crashed: {t.exception()!r}")
    drill.event(f"load over: {len(drill.calls)} calls, {drill.acked} acknowledged")
    if chaos_task is not None:
        try:
            await asyncio.wait_for(chaos_task, 60)
        except Exception as e:
            drill.problems.append(f"the chaos schedule failed: {e!r}")


# -- node processes ----------------------------------------------------------------------------------
class Fleet:
    """`nalar node` processes with stable names; each keeps every process it started, for cleanup."""

    def __init__(self, url: str, namespace: str, base: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.namespace = namespace
        self.base = base
        self.env = env or {}
        self.current: dict[str, NodeProc] = {}
        self.dirs: dict[str, Path] = {}
        self.generation: dict[str, int] = collections.Counter()
        self.ready: set[str] = set()
        self.gone: set[str] = set()  # killed for good
        self.all: list[NodeProc] = []
        self.restarting: list[asyncio.Task[None]] = []

    def spawn(self, name: str, empty: bool = False) -> NodeProc:
        if empty or name not in self.dirs:
            self.generation[name] += 1
            self.dirs[name] = self.base / name / f"state{self.generation[name]}"
        args = [SPEC, "--nats", self.url, "--namespace", self.namespace, "--name", name,
                "--state-dir", str(self.dirs[name]), "--grace", "1"]
        p = NodeProc(args, node_env(self.env))
        self.all.append(p)
        self.current[name] = p
        return p

    async def start(self, names: list[str]) -> None:
        procs = [(n, self.spawn(n)) for n in names]
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, 90) for _, p in procs))
        self.ready.update(names)

    def kill(self, name: str) -> None:
        p = self.current[name]
        self.ready.discard(name)
        p.proc.kill()
        p.proc.wait(10)

    async def restart(self, name: str, empty: bool = False) -> None:
        p = self.spawn(name, empty)
        await asyncio.to_thread(p.wait_ready, 90)
        self.ready.add(name)

    def died_by_themselves(self) -> list[str]:
        """Nodes that should be up (ready) but whose process ended: with the tail of their output."""
        out = []
        for name in sorted(self.ready):
            p = self.current[name]
            if p.proc.poll() is not None:
                out.append(f"node {name} exited with {p.proc.returncode} on its own:\n"
                           + "".join(p.output[-15:]))
        return out

    def stop(self) -> None:
        for p in self.all:
            p.stop(10)


# -- reading back and measuring ----------------------------------------------------------------------
@dataclass
class Readback:
    session: str
    final: list[Any] | None = None
    read_error: str = ""
    show: Any = None
    show_error: str = ""
    log: Any = None
    log_error: str = ""
    copies: dict[str, Any] = field(default_factory=dict)


async def _read_session(client: Any, session: str) -> Readback:
    r = Readback(session)
    try:
        got = await asyncio.wait_for(
            _await(client.stub(ACTOR).options(session=session, timeout=READ_TIMEOUT).tokens()), READ_TIMEOUT + 5)
        r.final = list(got) if isinstance(got, list) else None
        if r.final is None:
            r.read_error = f"tokens() returned {type(got).__name__}, not a list"
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError):
            raise
        r.read_error = f"{type(e).__name__}: {str(getattr(e, 'message', None) or e)[:200]}"
    return r


async def _read_views(client: Any, r: Readback, nodes: list[str]) -> None:
    for what in ("show", "log"):
        try:
            got = await asyncio.wait_for(client.state_async(r.session, what), READ_TIMEOUT)
            setattr(r, what, got)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            setattr(r, f"{what}_error", f"{type(e).__name__}: {e}"[:200])
    rt = client.runtime
    for node in nodes:  # each node's own copy: a stale one may lag, but never leave the lineage
        try:
            got = await rt.request(rt.subjects.node(node), {"op": "show", "session": r.session}, READ_TIMEOUT)
            unit = (got.get("units") or {}).get(ACTOR)
            if unit is not None:
                r.copies[node] = ((unit.get("objects") or {}).get("tokens"), node in (got.get("held") or []))
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            r.copies[node] = (f"unreadable: {type(e).__name__}: {e}"[:200], False)


def _listed(show_unit: Any) -> Any:
    return (show_unit.get("objects") or {}).get("tokens") if isinstance(show_unit, dict) else None


async def read_back(client: Any, sessions: list[str]) -> list[Readback]:
    """Every session's final list (a ``tokens()`` call), then its state views and each node's copy."""
    reads = await asyncio.gather(*(_read_session(client, s) for s in sessions))
    nodes = [str(st["node"]) for st in await client.status_async() if st.get("state")]
    await asyncio.gather(*(_read_views(client, r, nodes) for r in reads))
    return list(reads)


@dataclass
class Figures:
    calls: int = 0
    acked: int = 0
    unknown: int = 0
    failed: int = 0
    hung: int = 0
    lost: int = 0
    doubled: int = 0
    failed_applied: int = 0
    hung_applied: int = 0
    unknown_applied: int = 0  # allowed
    misplaced: int = 0
    foreign: int = 0
    version_gaps: int = 0
    doubled_commits: int = 0
    view_mismatch: int = 0
    forked_copies: int = 0
    unreadable: int = 0
    unfinished_callers: int = 0

    VIOLATIONS = ("lost", "doubled", "failed_applied", "hung", "misplaced", "foreign", "version_gaps",
                  "doubled_commits", "view_mismatch", "forked_copies", "unreadable", "unfinished_callers")

    def bad(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.VIOLATIONS if getattr(self, k)}

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items())


def _slot(final: list[Any], value: Any) -> Any:
    return final[value - 1] if isinstance(value, int) and 1 <= value <= len(final) else "nothing"


def measure(drill: Drill, reads: list[Readback]) -> tuple[Figures, list[str]]:
    """The figures, and one line per problem found (per session, with the tokens concerned)."""
    fig = Figures(calls=len(drill.calls), unfinished_callers=len(drill.unfinished_callers))
    by_session: dict[str, list[Call]] = collections.defaultdict(list)
    issued: dict[str, Call] = {}
    for c in drill.calls:
        by_session[c.session].append(c)
        issued[c.token] = c
        fig.acked += c.outcome == "ok"
        fig.unknown += c.outcome == "unknown"
        fig.failed += c.outcome == "failed"
        fig.hung += c.outcome in ("hung", "pending")
    lines: list[str] = []
    errors = collections.Counter(f"{c.outcome}:{c.error_type}: {c.error[:120]}" for c in drill.calls
                                 if c.outcome not in ("ok",))
    for r in reads:
        s = r.session
        calls = by_session.get(s, [])
        said: list[str] = []
        show_unit = (r.show or {}).get("units", {}).get(ACTOR) if isinstance(r.show, dict) else None
        final = r.final
        if final is None:
            shown = _listed(show_unit)
            if isinstance(shown, list):
                final = shown
                said.append(f"tokens() failed ({r.read_error}); measured on the `state show` list instead")
            else:
                acked = [c.token for c in calls if c.outcome == "ok"]
                fig.unreadable += 1
                fig.lost += len(acked)
                lines.append(f"{s}: UNREADABLE: tokens() failed ({r.read_error}), state show has no list "
                             f"({r.show_error or 'no ' + ACTOR + ' unit'}): its {len(acked)} acknowledged "
                             f"tokens count as lost")
                continue
        counts = collections.Counter(final)
        lost = [c for c in calls if c.outcome == "ok" and counts.get(c.token, 0) == 0]
        doubled = sorted(t for t, n in counts.items() if n > 1)
        foreign = [t for t in counts if t not in issued or issued[t].session != s]
        failed_applied = [c for c in calls if c.outcome == "failed" and counts.get(c.token)]
        hung_applied = [c for c in calls if c.outcome in ("hung", "pending") and counts.get(c.token)]
        unknown_applied = [c for c in calls if c.outcome == "unknown" and counts.get(c.token)]
        misplaced = [c for c in calls if c.outcome == "ok" and counts.get(c.token)
                     and not (isinstance(c.value, int) and 1 <= c.value <= len(final)
                              and final[c.value - 1] == c.token)]
        fig.lost += len(lost)
        fig.doubled += sum(counts[t] - 1 for t in doubled)
        fig.foreign += len(foreign)
        fig.failed_applied += len(failed_applied)
        fig.hung_applied += len(hung_applied)
        fig.unknown_applied += len(unknown_applied)
        fig.misplaced += len(misplaced)

        def few(xs: list[Any]) -> str:
            shown = [x.token if isinstance(x, Call) else x for x in xs[:DETAIL_TOKENS]]
            return f"{shown}{' ...' if len(xs) > DETAIL_TOKENS else ''}"

        n_ok = sum(c.outcome == "ok" for c in calls)
        if lost:
            said.append(f"LOST {len(lost)} of {n_ok} acknowledged: {few(lost)}")
        if doubled:
            said.append(f"DOUBLED {len(doubled)} tokens: {[(t, counts[t]) for t in doubled[:DETAIL_TOKENS]]}")
        if foreign:
            said.append(f"FOREIGN tokens (never sent to this session): {few(foreign)}")
        if failed_applied:
            said.append(f"FAILED BUT APPLIED {len(failed_applied)}: "
                        + "; ".join(f"{c.token} ({c.error_type}: {c.error[:80]})" for c in failed_applied[:3]))
        if hung_applied:
            said.append(f"hung but applied {len(hung_applied)}: {few(hung_applied)}")
        if misplaced:
            said.append(f"MISPLACED {len(misplaced)} (not at the position append returned): "
                        + "; ".join(f"{c.token} returned {c.value!r}, slot holds {_slot(final, c.value)}"
                                    for c in misplaced[:3]))
        # the state views: the shown list, its version, the log's versions
        shown = _listed(show_unit)
        if r.show_error or show_unit is None:
            fig.view_mismatch += 1
            said.append(f"STATE SHOW has no {ACTOR} unit ({r.show_error or 'absent'})")
        else:
            if isinstance(shown, list) and shown != final:
                fig.view_mismatch += 1
                said.append(f"STATE SHOW differs from tokens(): {len(shown)} vs {len(final)} tokens")
            elif isinstance(shown, dict) and "$large" in shown:
                drill.notes.append(f"{s}: state show summarised the list ({shown['$large']} bytes)")
            version = show_unit.get("version")
            if isinstance(version, int) and version != len(final):
                fig.version_gaps += 1
                said.append(f"VERSION: state show says v{version} for {len(final)} tokens")
        log_entries = (r.log or {}).get("units", {}).get(ACTOR) if isinstance(r.log, dict) else None
        if not isinstance(log_entries, list):
            fig.version_gaps += 1
            said.append(f"STATE LOG has no {ACTOR} entries ({r.log_error or 'absent'})")
        else:
            versions = [e.get("version") for e in log_entries if isinstance(e, dict)]
            gaps = [(a, b) for a, b in zip(versions, versions[1:], strict=False)
                    if not (isinstance(a, int) and b == a + 1)]
            end = versions[-1] if versions else 0
            if gaps or end != len(final) or (final and not versions):
                fig.version_gaps += 1
                said.append(f"VERSIONS: log has {len(versions)} entries v{versions[0] if versions else '-'}.."
                            f"v{end} for {len(final)} tokens; breaks at {gaps[:4]}")
            fids = collections.Counter(e.get("f") for e in log_entries if isinstance(e, dict) and e.get("f"))
            twice = [f for f, n in fids.items() if n > 1]
            if twice:
                fig.doubled_commits += len(twice)
                said.append(f"DOUBLED COMMITS: future ids in the log twice: {twice[:3]}")
        for node, (copy, held) in sorted(r.copies.items()):
            if isinstance(copy, list) and copy != final[:len(copy)]:
                fig.forked_copies += 1
                div = next((k for k, (a, b) in enumerate(zip(copy, final, strict=False)) if a != b),
                           min(len(copy), len(final)))
                said.append(f"FORKED COPY on {node}{' (holder)' if held else ''}: {len(copy)} tokens, not a "
                            f"prefix of the final {len(final)}; diverges at index {div}")
            elif isinstance(copy, str):
                drill.notes.append(f"{s}: copy on {node} {copy}")
        if said:
            lines.append(f"{s} ({len(calls)} calls, {n_ok} acked, final list {len(final)}): " + " | ".join(said))
    for c in drill.calls:
        if c.outcome in ("hung", "pending"):
            lines.append(f"HUNG call {c.token} (sent at {c.started:.2f}s): {c.error or 'its caller was cancelled'}")
            if sum(1 for x in lines if "HUNG call" in x) >= DETAIL_TOKENS:
                break
    if drill.unfinished_callers:
        lines.append(f"UNFINISHED callers: {drill.unfinished_callers[:8]}")
    if errors:
        lines.append("call errors seen: " + "; ".join(f"{n}x {k}" for k, n in errors.most_common(6)))
    return fig, lines


def conclude(drill: Drill, fig: Figures, lines: list[str], extra: list[str] | None = None) -> None:
    """Print the figures; fail with every violation, its sessions and tokens, and the chaos log."""
    head = f"[{drill.name}] {fig.line()}"
    print(head)
    for n in drill.notes[:10]:
        print("  note:", n)
    for e in drill.events[:40]:
        print("  event:", e)
    for x in lines:
        if x.startswith("call errors"):
            print(" ", x)
    problems = list(drill.problems) + list(extra or [])
    bad = fig.bad()
    if bad or problems:
        tail = ("HUNG", "UNFINISHED", "call errors")
        detail = [x for x in lines if not x.startswith(tail)][:DETAIL_SESSIONS]
        detail += [x for x in lines if x.startswith(tail)]
        msg = "\n".join([f"{drill.name}: session state forked or vanished: {bad or 'harness problems'}", head,
                         *problems, *detail,
                         "events:", *drill.events[:40]])
        pytest.fail(msg, pytrace=False)


async def _node_counts(client: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for st in await client.status_async():
        a = (st.get("actors") or {}).get(ACTOR) or {}
        out[str(st.get("node"))] = {"done": a.get("done", 0), "failed": a.get("failed", 0),
                                    "state": {k: v for k, v in (st.get("state") or {}).items()
                                              if isinstance(v, (int, float, str))}}
    return out


async def _close(clients: list[Any]) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.aclose(), 15)


# -- the drills --------------------------------------------------------------------------------------
@pytest.mark.timeout(_BUDGET)
@pytest.mark.parametrize("n_nodes", [3, 4])
def test_fork_drill_calls_of_one_session_on_every_node_at_once(n_nodes, nats_url, namespace, tmp_path):
    """Two callers per session, their calls spread over every node at once: one lineage per session."""
    sessions = [f"fork{n_nodes}-s{k:02d}" for k in range(20)]
    names = [f"f{k}" for k in range(n_nodes)]
    # homes off: each session's calls run wherever the queue group delivers them, on every node at
    # once, so its commits race for real (with homes on, they would go to one node per session)
    fleet = Fleet(nats_url, namespace, tmp_path, env={"NALAR_SESSION_HOMES": "off"})
    drill = Drill(f"fork drill, {n_nodes} nodes")

    async def run() -> tuple[Figures, list[str], list[str]]:
        await fleet.start(names)
        clients = await drive(drill, nats_url, namespace, sessions, DRILL_SECONDS)
        try:
            served = await _node_counts(clients[0])
            drill.event(f"calls served per node: { {n: v['done'] for n, v in served.items()} }")
            extra = fleet.died_by_themselves()
            idle = [n for n in names if served.get(n, {}).get("done", 0) == 0]
            if idle:  # the drill did not drill: the calls of a session must land on every node
                extra.append(f"nodes that served no call: {idle} (served: {served}); the queue group did "
                             "not spread the calls, so this run proves nothing about forks")
            reads = await read_back(clients[0], sessions)
            fig, lines = measure(drill, reads)
            return fig, lines, extra
        finally:
            await _close(clients)

    try:
        fig, lines, extra = asyncio.run(run())
    finally:
        fleet.stop()
    conclude(drill, fig, lines, extra)


@pytest.mark.timeout(_BUDGET)
def test_crash_drill_kill_9_restart_lose_a_node_and_an_empty_store(nats_url, namespace, tmp_path):
    """SIGKILLs under load: restarts on the same store, one node gone for good, one back with nothing."""
    seed = int(os.environ.get("NALAR_DRILL_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    sessions = [f"crash-s{k:02d}" for k in range(10)]
    names = ["c0", "c1", "c2"]
    fleet = Fleet(nats_url, namespace, tmp_path)
    drill = Drill(f"crash drill (NALAR_DRILL_SEED={seed})")
    # (fraction of the drill, what): "restart" = kill -9, back ~1 s later on the same state dir
    schedule = [(0.10, "restart"), (0.22, "restart"), (0.34, "restart"), (0.46, "empty"), (0.58, "gone"),
                (0.72, "restart"), (0.86, "restart")]

    async def chaos(d: Drill) -> None:
        await d.until_acked(20, 30)
        for frac, what in schedule:
            await asyncio.sleep(max(0.0, frac * CHAOS_SECONDS - d.now()))  # the schedule itself
            victims = sorted(fleet.ready - fleet.gone)
            if len(victims) < 1 or (what == "gone" and len(victims) < 2):
                d.event(f"{what}: no victim ready, skipped")
                continue
            v = rng.choice(victims)
            fleet.kill(v)
            if what == "gone":
                fleet.gone.add(v)
                d.event(f"kill -9 {v}: gone for good")
                continue
            d.event(f"kill -9 {v}" + (", back on an EMPTY state dir" if what == "empty" else ""))

            async def back(v: str = v, empty: bool = what == "empty") -> None:
                await asyncio.sleep(1.0)  # the schedule: restarted ~1 s later
                await fleet.restart(v, empty)
                d.event(f"{v} ready again ({'empty store' if empty else 'same store'})")

            fleet.restarting.append(asyncio.create_task(back()))
        await asyncio.gather(*fleet.restarting)

    async def run() -> tuple[Figures, list[str], list[str]]:
        await fleet.start(names)
        clients = await drive(drill, nats_url, namespace, sessions, CHAOS_SECONDS, chaos)
        try:
            extra = fleet.died_by_themselves()
            kills = sum(1 for e in drill.events if "kill -9" in e)
            if kills < 5:
                extra.append(f"the chaos schedule ran only {kills} kills")
            reads = await read_back(clients[0], sessions)
            fig, lines = measure(drill, reads)
            return fig, lines, extra
        finally:
            await _close(clients)

    try:
        fig, lines, extra = asyncio.run(run())
    finally:
        fleet.stop()
    conclude(drill, fig, lines, extra)


@pytest.fixture
def nats_cluster(tmp_path: Path):
    from cluster import NatsCluster
    from nalar.bus.server import find_server_binary

    try:
        binary = find_server_binary()
    except nalar.ServerNotFound as e:
        pytest.skip(f"the cluster drill needs the nats-server binary: {e}")
    c = NatsCluster(tmp_path / "cluster", 3, binary=binary)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.timeout(_BUDGET)
def test_cluster_drill_kill_9_the_state_streams_leader_mid_load(nats_cluster, namespace, tmp_path, monkeypatch):
    """3 clustered servers, state kept with 3 replicas: its stream leader dies mid-load and comes back."""
    from cluster import list_streams, stream_info, stream_leader

    monkeypatch.setenv("NALAR_REPLICAS", "3")
    url = nats_cluster.url  # every node and client gets all three servers (comma-separated)
    stream = f"nalar_{namespace}_state"
    sessions = [f"clu-s{k:02d}" for k in range(10)]
    names = ["k0", "k1", "k2"]
    fleet = Fleet(url, namespace, tmp_path, env={"NALAR_REPLICAS": "3"})
    drill = Drill("cluster drill")
    extra: list[str] = []

    async def chaos(d: Drill) -> None:
        await d.until_acked(20, 30)
        leader = await stream_leader(nats_cluster.urls, stream, 15)
        if leader is None:
            have = await list_streams(nats_cluster.urls)
            extra.append(f"the state stream {stream} does not exist after {d.acked} acknowledged calls "
                         f"(streams: {have}): session state is not kept in a replicated log")
            placement = f"KV_nalar_{namespace}_placement"
            leader = await stream_leader(nats_cluster.urls, placement, 15) if placement in have else None
            d.event(f"no state stream; killing the leader of {placement if leader else 'nothing'} instead")
            leader = leader or nats_cluster.names()[0]
        info = await stream_info(nats_cluster.urls, stream, 10)
        if info is not None:
            d.event(f"state stream {stream}: {info.config.num_replicas} replicas, leader {leader}, "
                    f"{info.state.messages} messages")
            if info.config.num_replicas != 3:
                extra.append(f"the state stream has {info.config.num_replicas} replicas, not 3 (NALAR_REPLICAS=3)")
        await asyncio.sleep(max(0.0, 0.35 * CHAOS_SECONDS - d.now()))  # the schedule: mid-load
        i = nats_cluster.index_of(leader)
        nats_cluster.kill(i)
        d.event(f"kill -9 nats-server {leader}")
        await asyncio.sleep(5.0)  # the schedule: down for 5 s
        nats_cluster.restart(i, wait=False)  # spawned here, on the loop's (main) thread
        await asyncio.to_thread(nats_cluster.wait_started, i)
        d.event(f"nats-server {leader} ready again")
        if info is not None:
            d.event(f"state stream leader now {await stream_leader(nats_cluster.urls, stream, 20)}")

    async def run() -> tuple[Figures, list[str]]:
        await fleet.start(names)
        clients = await drive(drill, url, namespace, sessions, CHAOS_SECONDS, chaos)
        try:
            extra.extend(fleet.died_by_themselves())
            if not any("kill -9 nats-server" in e for e in drill.events):
                extra.append("the stream leader was never killed")
            reads = await read_back(clients[0], sessions)
            fig, lines = measure(drill, reads)
            return fig, lines
        finally:
            await _close(clients)

    try:
        fig, lines = asyncio.run(run())
    finally:
        fleet.stop()
    conclude(drill, fig, lines, extra)
