"""The executor: a node process that hosts actor instances and serves their calls (the local controller).

Where things live (imports run down this list, never up):

- ``calls.py``    the records (``Call``, ``Instance``, ``ActorGroup``, ``Book``) and the seams between
                  parts (``Queue``, ``Answer``, ``StateGate``): a leaf
- ``queues.py``   the scheduler: priority queues, late binding, admission budgets; no bus, unit-tested
- ``hosting.py``  instance lifecycle: create, ``on_start``, pykka threads, ``on_stop``
- ``resources.py`` the node's capacity (declared, else the machine's) and what its instances hold
- ``spans.py``    a call's server-side tracing spans
- ``execute.py``  running bound calls (tasks and threads), answering them, cancel and deadlines
- ``sessions.py`` session admission behind ``StateGate``: units held here, turns, commits, moves
- ``enforce.py``  carrying out the policy's decisions; forwarding calls that belong elsewhere
- ``report.py``   status, the policy's metrics, the node's control subject
- ``metrics.py``  the node's Prometheus collector (read at scrape time, on the loop)
- ``intake.py``   admission at the edge: validate, deduplicate, forward, refuse or accept
- ``node.py``     ``Node``: composes the parts, subscribes them, starts and stops
- ``local.py``    local mode: a client and a node in one process, no server
"""
from .node import Node, default_node_name

__all__ = ["Node", "default_node_name"]
