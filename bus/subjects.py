"""The subject scheme. Every subject starts with ``nalar.<namespace>.`` so deployments can share a server.

==============================  =======================================  ==========================
subject                         who listens                              what travels
==============================  =======================================  ==========================
``nalar.<ns>.call.<actor>``     every node hosting ``actor`` (queue      a call (envelope below)
                                group ``<actor>``: one node gets it)
``nalar.<ns>.r.<proc>.<n>``     the process that made future ``n``       the reply to that call
``nalar.<ns>.r.<proc>.ack``     that process                             "node X holds calls [n...]"
``nalar.<ns>.cancel``           every node                               ids of cancelled futures
``nalar.<ns>.status``           every node (scatter/gather)              a node's status as JSON
``nalar.<ns>.node.<node>``      one node                                 control requests
``nalar.<ns>.hb.<node>``        every process (to spot dead executors)   a node's heartbeat, 1/s
``nalar.<ns>.policy``           reserved for the policy actor            decisions (issue 4)
``nalar.<ns>.metrics.<node>``   reserved for the policy actor            metrics (issue 4)
==============================  =======================================  ==========================
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_token(value: str, what: str) -> str:
    """Names that become subject tokens must not contain dots, wildcards or spaces."""
    if not isinstance(value, str) or not _TOKEN.match(value):
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

    def reply_prefix(self, proc: str) -> str:
        return f"{self.prefix}r.{proc}."

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

    def metrics(self, node: str) -> str:
        return f"{self.prefix}metrics.{node}"

    def inbox(self, proc: str, name: str) -> str:
        return f"{self.prefix}inbox.{proc}.{name}"
