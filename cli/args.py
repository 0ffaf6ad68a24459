"""argparse as the ecosystem expects it: global flags anywhere, options between positionals, help
instead of an error for a missing subcommand.

argparse copies a subparser's defaults over what the main parser parsed, so ``nalar --nats URL call``
would lose URL to ``call``'s own default. ``finish`` gives every subcommand's global flags a
``SUPPRESS`` default instead (a flag not given sets nothing) and keeps the real defaults aside;
``settle`` applies them after parsing and refuses a global flag the command does not take.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Iterator, Sequence

#: dest -> (flag, its help where the command connects, the help a copy without one of its own gets).
GLOBALS: dict[str, tuple[str, str, str]] = {
    "nats": ("--nats", "NATS URL(s), comma-separated (default: $NALAR_NATS_URL, else the `nalar up` running "
                       "on this machine)", "NATS URL(s), comma-separated"),
    "namespace": ("--namespace", "deployment namespace (default: $NALAR_NAMESPACE, else the local `nalar up`'s, "
                                 "else 'default')", "deployment namespace (default: $NALAR_NAMESPACE, else 'default')"),
    "timeout": ("--timeout", "seconds: a call's deadline, how long status and state wait for answers; connecting "
                             "never takes longer (each command's --help gives its default)",
                "seconds to wait, connecting included"),
}

_METAVARS = {"nats": "URL", "namespace": "NS", "timeout": "S"}
_TYPES: dict[str, Callable[[str], Any]] = {"timeout": float}


class Parser(argparse.ArgumentParser):
    """Options may come between positionals: ``nalar call Echo.echo --session s '[1]'``.

    Plain argparse stops filling positionals at the first option; intermixed parsing does not, but
    cannot handle a parser with subcommands or a REMAINDER, which keep the plain rules.
    """

    _intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or not self._intermixable():
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back in here, twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _intermixable(self) -> bool:
        return not any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions if not a.option_strings)


def add_globals(p: argparse.ArgumentParser) -> None:
    """The main parser's copies of the global flags: they set a value only when given."""
    for dest, (flag, connecting, _) in GLOBALS.items():
        p.add_argument(flag, metavar=_METAVARS[dest], type=_TYPES.get(dest, str), default=argparse.SUPPRESS,
                       help=connecting)


def walk(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``p`` and every parser below it, once each (aliases share a parser)."""
    seen: set[int] = set()
    todo = [p]
    while todo:
        q = todo.pop(0)
        if id(q) in seen:
            continue
        seen.add(id(q))
        yield q
        for a in q._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo.extend(a.choices.values())


def subcommands(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def _taken(p: argparse.ArgumentParser) -> set[str]:
    """The global flags that ``p``, or some command below it, takes."""
    sub = subcommands(p)
    own = {a.dest for a in p._actions if a.dest in GLOBALS and a.option_strings}
    return own.union(*(_taken(c) for c in sub.choices.values())) if sub is not None else own


def finish(root: argparse.ArgumentParser) -> None:
    """Make the tree follow the conventions above; call once, after every subcommand is added."""
    for p in walk(root):
        sub = subcommands(p)
        if sub is not None:
            sub.required = False  # a missing subcommand prints that command's help (``settle``)
            if p is not root:  # `nalar state --nats URL show S`: a group takes what its commands take
                taken, have = _taken(p), {a.dest for a in p._actions}
                for dest in sorted(taken - have):
                    flag, connecting, plain = GLOBALS[dest]
                    p.add_argument(flag, default=argparse.SUPPRESS, metavar=_METAVARS[dest],
                                   type=_TYPES.get(dest, str), help=connecting if "nats" in taken else plain)
        kept: dict[str, Any] = {}
        for a in p._actions:
            if a.dest in GLOBALS and a.option_strings and a.default is not argparse.SUPPRESS:
                kept[a.dest] = a.default
                a.default = argparse.SUPPRESS
                a.help = a.help or GLOBALS[a.dest][2]
        p.set_defaults(_leaf=p, _globals=kept)  # the deepest parser reached sets these last


def settle(a: argparse.Namespace) -> argparse.ArgumentParser | None:
    """Apply the kept defaults; refuse a global flag the command does not take (argparse's usage error).

    Returns the parser whose help to print when its subcommand is missing (bare ``nalar``, ``nalar state``).
    """
    leaf: argparse.ArgumentParser = a._leaf
    sub = subcommands(leaf)
    if sub is not None and getattr(a, sub.dest, None) is None:
        return leaf
    kept: dict[str, Any] = a._globals
    for dest, (flag, _, _) in GLOBALS.items():
        if dest in kept:
            if not hasattr(a, dest):
                setattr(a, dest, kept[dest])
        elif hasattr(a, dest):
            leaf.error(f"{flag} does not apply to `{leaf.prog}`")
    return None


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def byte_size(text: str) -> int:
    """``8388608``, ``8MiB``, ``512K``: binary units, as nats-server reads ``8MB`` in its config."""
    t = text.strip().lower().replace("_", "")
    digits = t.rstrip("kmib")
    try:
        n = int(digits) * _UNITS[t[len(digits):]]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size in bytes, e.g. 8388608 or 8MiB") from None
    return n


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port number, 1-65535")
    return int(text)


def port_or_zero(text: str) -> int:
    """A port, or 0 for none (a listener that is off)."""
    if text.strip() == "0":
        return 0
    return port(text)
