"""Per-node LMDB session state: managed objects, versions, group commit, placement, migration.

The unit of state is (session, actor). See ``keys`` for the layout, ``committer`` for how versions are
committed exactly once, ``placement`` for who holds what, ``transfer`` for how units move.

Where things live (it imports only ``bus``):

    keys.py        the LMDB key layout: unit heads, object versions, the log, future ids
    store.py       the per-node LMDB store: reads from any thread, a map that grows, ``StateFull``
    committer.py   group commit: one writer thread, one durable transaction per batch, callbacks
    managed.py     managed lists, dicts and values, and the call's ``Txn`` that records their changes
    placement.py   which node holds each unit: a JetStream KV bucket, or a dict in local mode
    transfer.py    the wire format of a unit moving between nodes (framed records, SHA-256)
"""
from .committer import Commit, Committer, Drop, Put
from .managed import ManagedDict, ManagedList, ManagedValue, Txn, current_txn, managed_dict, managed_list, managed_value
from .placement import KVPlacement, LocalPlacement, Placement
from .store import Store

__all__ = [
    "Commit", "Committer", "Drop", "KVPlacement", "LocalPlacement", "ManagedDict", "ManagedList", "ManagedValue",
    "Placement", "Put", "Store", "Txn", "current_txn", "managed_dict", "managed_list", "managed_value",
]
