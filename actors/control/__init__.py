"""The contract between the two control levels: the policy actor and each node's local controller.

The policy actor decides from the metrics nodes report and broadcasts decision ops in versioned
batches; every process (nodes and callers) applies them to its own ``DecisionTable`` and reads it on
the critical path. Both sides import this package; it imports only ``bus``.

=============  ================================================================================
file           what it holds
=============  ================================================================================
``ops.py``     one typed class per decision-op kind: wire form, validation, effect on the table,
               no-op test; ``op_from_wire``
``table.py``   ``DecisionTable``: the decisions in force, applied batch by batch, read per call
``rows.py``    the metrics a node reports: ``InstanceRow``, ``WaitingRow``, ``NodeMetrics``
``term.py``    ``TermGate``: the leader term a process trusts; a batch of an older or unproven term
               is refused, one of a new term waits (with those behind it) for the lease to prove it
``checks.py``  what a node refuses on arrival, whoever sent it: instance counts that break the
               hints, version jumps; ``Refusals`` counts them
=============  ================================================================================

Ops on the wire (JSON lists, first the kind):

=======================================================  =============================================
op                                                       meaning
=======================================================  =============================================
``["route", session, actor, instance|null]``             hard session route (``null`` removes it)
``["affinity", session, actor, instance|null]``          soft route: the session's calls go to and wait
                                                         for that instance (its cache) until the
                                                         policy moves them
``["weights", actor, {instance: weight}|null]``          share of an actor's unrouted calls
``["priority", session, value|null, actor|null]``        priority of a session's calls (at ``actor``)
``["migrate", id, session, actor, src, dst(, "soft")]``  move queued calls (and state) src -> dst; its
                                                         later calls follow by a route (by affinity if
                                                         ``"soft"``)
``["scale", node, actor, count|null, [drain ids]]``      desired instance count of actor on node
``["instance", instance, node|null]``                    where an instance lives (for callers)
``["sticky", actor, [instance, ...]|null]``              static binding: a session's calls to ``actor``
                                                         go to the instance its id hashes to; other
                                                         calls go round-robin (bound on arrival)
``["home", actor, [instance, ...]|null]``                where a session without a route or affinity
                                                         goes, softly (as ``affinity``): the instance
                                                         its id hashes to (rendezvous hashing: adding
                                                         or removing one instance moves only the
                                                         sessions it gains or loses)
``["order", actor|"*", weight|null, bound]``             program-level scheduling: among calls of one
                                                         priority, the least-served program first, as
                                                         if its request started ``weight`` x its
                                                         service later, at most ``bound`` s later
=======================================================  =============================================
"""
from .ops import KINDS, OPS, Affinity, Home, InstanceAt, Migrate, Op, Order, Priority, Route, Scale, Sticky, \
    Weights, op_from_wire
from .checks import MAX_VERSION_JUMP, Refusals, max_instances_per_node
from .rows import ActorMetrics, InstanceRow, NodeMetrics, WaitingRow
from .table import MAX_SESSION_ROUTES, DecisionTable, home_of
from .term import TermGate, term_of

__all__ = [
    "ActorMetrics", "Affinity", "DecisionTable", "Home", "InstanceAt", "InstanceRow", "KINDS", "MAX_SESSION_ROUTES",
    "MAX_VERSION_JUMP", "Migrate", "NodeMetrics", "OPS", "Op", "Order", "Priority", "Refusals", "Route", "Scale", "Sticky",
    "TermGate", "WaitingRow", "Weights", "home_of", "max_instances_per_node", "op_from_wire", "term_of",
]
