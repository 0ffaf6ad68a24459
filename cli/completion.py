"""``nalar completion SHELL``: a tab-completion script generated from the parser itself.

shtab writes it from the same argparse tree ``nalar --help`` prints, so a new option completes without
anyone editing a script, and the script is static: a TAB press runs the shell, not Python (argcomplete
would start nalar, about half a second here, on every press).
"""
from __future__ import annotations

import argparse
import sys

import shtab

from .args import subcommands, walk

SHELLS = ("bash", "zsh", "tcsh", "fish")

DESCRIPTION = """\
Print a completion script for SHELL on stdout. Install it once:

  bash   nalar completion bash > ~/.local/share/bash-completion/completions/nalar
         (or add `eval "$(nalar completion bash)"` to ~/.bashrc)
  zsh    nalar completion zsh > ~/.zfunc/_nalar   with `fpath+=~/.zfunc; autoload -U compinit; compinit`
         in ~/.zshrc
  tcsh   nalar completion tcsh > ~/.nalar.tcsh    and `source ~/.nalar.tcsh` in ~/.tcshrc
  fish   nalar completion fish > ~/.config/fish/completions/nalar.fish"""


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh, tcsh, fish)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")


def run(a: argparse.Namespace, root: argparse.ArgumentParser) -> int:
    sys.stdout.write(script(root, a.shell))
    return 0


def script(root: argparse.ArgumentParser, shell: str) -> str:
    """shtab describes a subcommand by its ``description`` (a paragraph) if it has one: show each
    subcommand's one-line ``help`` instead, as ``nalar --help`` does."""
    saved: list[tuple[argparse.ArgumentParser, str | None]] = []
    for p in walk(root):
        sub = subcommands(p)
        if sub is None:
            continue
        for choice in sub._choices_actions:
            parser = sub.choices[choice.dest]
            saved.append((parser, parser.description))
            parser.description = choice.help
    try:
        return shtab.complete(root, shell)
    finally:
        for parser, description in saved:
            parser.description = description
