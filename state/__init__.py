"""Per-host LMDB store: managed objects, versions, commits, migration, placement (issue 3)."""
