"""The subject scheme. Every subject starts with ``nalar.<namespace>.`` so deployments can share a server.

==============================  =======================================  ==========================
subject                         who listens                              what travels
==============================  =======================================  ==========================
``nalar.<ns>.call.<actor>``     every node hosting ``actor`` (queue      a call (envelope below)
                                group ``<actor>``: one node gets it)
``nalar.<ns>.call.<actor>.<n>`` node ``n`` only (routed calls)           a call
``nalar.<ns>.r.<who>.<proc>.<n>``  the process that made future ``n``    the reply to that call
``nalar.<ns>.r.<who>.<proc>.q<n>``  that process (``request``/``scatter``) the replies to request n
``nalar.<ns>.r.<who>.<proc>.ack``   that process                        "node X holds calls [n...]"
``nalar.<ns>.r.<who>._i.<id>``      that credential's nats-py inboxes   JetStream API replies
``nalar.<ns>.cancel``           every node                               ids of cancelled futures
``nalar.<ns>.status``           every node (scatter/gather)              a node's status as JSON
``nalar.<ns>.node.<node>``      one node                                 control requests
``nalar.<ns>.hb.<node>``        every process (to spot dead executors)   a node's heartbeat, 1/s
``nalar.<ns>.policy``           every process (nodes reply "applied")    versioned decision batches
``nalar.<ns>.metrics``          every node (scatter/gather)              a node's compact metrics
``nalar.<ns>.policy.status``    the policy actor                         its rounds and decisions
``nalar.<ns>.policy.snapshot``  one node (queue group ``snapshot``)      the decisions in force, in full
``nalar.<ns>.state.<s>.<a>``    JetStream (stream ``nalar_<ns>_state``)  session state, per unit
==============================  =======================================  ==========================

``<who>`` is the principal of the process's credential (``bus/auth.py``): under authentication only
that credential may subscribe to ``nalar.<ns>.r.<who>.>``, so replies reach only who asked.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")


def check_token(value: str, what: str) -> str:
    """Names that become subject tokens must not contain dots, wildcards or spaces."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):  # fullmatch: "$" would let "x\n" through
        raise ValueError(f"{what} {value!r} is not a valid name: use letters, digits, '_' and '-'")
    return value


class Subjects:
    """Builds the subjects of one namespace."""

    __slots__ = ("ns", "prefix")

    def __init__(self, namespace: str = "default") -> None:
        self.ns = check_token(namespace, "namespace")
        self.prefix = f"nalar.{namespace}."

    def call(self, actor: str) -> str:
        return f"{self.prefix}call.{actor}"

    def call_at(self, actor: str, node: str) -> str:
        """One node's own subject for ``actor``: where routed calls go."""
        return f"{self.prefix}call.{actor}.{node}"

    def reply_prefix(self, principal: str, proc: str) -> str:
        """Where one process's replies arrive: under its credential's principal, then its own id."""
        return f"{self.prefix}r.{principal}.{proc}."

    @property
    def cancel(self) -> str:
        return f"{self.prefix}cancel"

    @property
    def status(self) -> str:
        return f"{self.prefix}status"

    def node(self, node: str) -> str:
        return f"{self.prefix}node.{node}"

    def heartbeat(self, node: str) -> str:
        return f"{self.prefix}hb.{node}"

    @property
    def policy(self) -> str:
        return f"{self.prefix}policy"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}metrics"

    @property
    def policy_status(self) -> str:
        return f"{self.prefix}policy.status"

    @property
    def policy_snapshot(self) -> str:
        """Where clients ask for the decisions in force (nodes answer, one each time: a queue group)."""
        return f"{self.prefix}policy.snapshot"

    def replies_ok(self) -> tuple[str, ...]:
        """The only subjects a message may ask to be answered on: a nalar inbox, or a plain NATS one.

        Anything else (a state subject, a KV key, the JetStream API) is dropped unanswered: a node or
        the policy actor may publish there with its own permissions, and must not do so for a caller.
        """
        return (f"{self.prefix}r.", "_INBOX.")
