"""Per-node LMDB session state: managed objects, versions, group commit, placement, migration.

The unit of state is (session, actor). See ``keys`` for the layout, ``committer`` for how versions are
committed exactly once, ``placement`` for who holds what, ``transfer`` for how units move.
"""
from .committer import Commit, Committer, Drop, Put
from .managed import ManagedDict, ManagedList, ManagedValue, Txn, current_txn, managed_dict, managed_list, managed_value
from .placement import KVPlacement, LocalPlacement, Placement
from .store import Store

__all__ = [
    "Commit", "Committer", "Drop", "KVPlacement", "LocalPlacement", "ManagedDict", "ManagedList", "ManagedValue",
    "Placement", "Put", "Store", "Txn", "current_txn", "managed_dict", "managed_list", "managed_value",
]
