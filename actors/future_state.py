"""The states every nalar future is in, and the one lock that guards them (``future.py``, ``stream.py``).

One lock for all futures, held for a few instructions, keeps a pending future at a few hundred bytes.
"""
from __future__ import annotations

import threading

PENDING, DONE, FAILED = 0, 1, 2
LOCK = threading.Lock()
