"""The exit statuses every ``nalar`` command uses, and the text ``nalar --help`` lists them with.

Scripts branch on these, so they are one table, not numbers scattered through the subcommands.
"""
from __future__ import annotations

OK = 0
REMOTE = 1  # the call reached nalar and failed there (or nothing answered)
USAGE = 2  # bad arguments or input: argparse's own status for a usage error
CONNECT = 3  # NATS could not be reached or refused the connection
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `seq 1e9 | head -1`'s writer

EPILOG = f"""\
exit status:
  {OK}    ok
  {REMOTE}    remote error: the actor raised, no node serves it, the deadline passed, or no node answered
  {USAGE}    usage: bad arguments or input (JSON, file, ACTOR.METHOD, an argument over max_payload)
  {CONNECT}    cannot connect: the message names the NATS URL and the cause
  {INTERRUPTED}  interrupted (Ctrl-C)
  {BROKEN_PIPE}  stdout was closed early (e.g. `nalar status | head -1`); nothing is printed"""
