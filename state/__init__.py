"""Session state: a fenced, replicated log per unit on JetStream, and each node's LMDB copy of it.

The unit of state is (session, actor). ``log`` is the source of truth (JetStream decides the order of
each unit's versions); ``store`` is this node's materialised copy, read locally; ``sync`` keeps the
two in step (commits go to the log first, catching up reads it).

Where things live (it imports only ``bus``):

    keys.py        the LMDB key layout: unit heads, latest objects, the version window, future ids
    record.py      one commit as the log holds it: deltas (an append records the new items) or a snapshot
    log.py         the per-unit log: a JetStream stream, fenced appends; ``LocalLog`` without JetStream
    store.py       the per-node LMDB store: reads from any thread, a map that grows, ``StateFull``
    committer.py   group commit: one writer thread, one LMDB transaction per batch of log entries
    sync.py        committing through the log, catching up from it, snapshots
    managed.py     managed lists, dicts and values, and the call's ``Txn`` that records their changes
    upgrade.py     reading a store written before the log, so a node upgraded in place loses nothing
"""
from .committer import Apply, Committer, Drop, Entry
from .log import Fenced, JetStreamLog, LocalLog, UnitLog, Unreachable
from .managed import ManagedDict, ManagedList, ManagedValue, Txn, current_txn, managed_dict, managed_list, managed_value
from .store import Store
from .sync import UnitSync

__all__ = [
    "Apply", "Committer", "Drop", "Entry", "Fenced", "JetStreamLog", "LocalLog", "ManagedDict", "ManagedList",
    "ManagedValue", "Store", "Txn", "UnitLog", "UnitSync", "Unreachable", "current_txn", "managed_dict",
    "managed_list", "managed_value",
]
