"""The replication core, in the order an event travels.

``subscriber`` holds one user's live socket on one server and hands its messages to ``intake``,
which turns ``UserDataChanged`` entries into observations (and reads items back when the echo
rule cannot attribute an event); ``catchup`` and ``reconcile`` produce the same observations
from REST scans, ``sessions`` from playback that ended without a stop. ``users`` and ``tokens``
say who a server's account is; ``identity``, ``index`` and ``filters`` say which canonical item a
server's item is and whether it is synced at all. ``echo``, ``merge`` and ``rewatch`` are the pure
decisions (is this our own write coming back; which value wins; is this un-play a rewatch), and
``resetguard`` refuses to spread a wiped server. The ``ledger`` package keeps it all in SQLite
and queues one outbox row per peer that must change, and ``delivery`` is the only path by which
rows become writes on a peer (for ``jfsync run`` and ``jfsync reconcile`` alike).
"""
