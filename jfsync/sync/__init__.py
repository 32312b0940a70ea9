"""The replication core, in the order an event travels.

``subscriber`` holds one user's live socket on one server and turns ``UserDataChanged`` frames
into observations; ``catchup`` and ``reconcile`` produce the same observations from REST scans.
``users`` and ``tokens`` say who a server's account is; ``identity`` and ``index`` say which
canonical item a server's item is (``filters`` keeps a server's excluded libraries out of the
index). ``echo`` and ``merge`` are the pure decisions (is this our own
write coming back; which value wins), and ``resetguard`` refuses to spread a wiped server. The
``ledger`` package keeps it all in SQLite and queues one outbox row per peer that must change, and
``delivery`` is the only path by which rows become writes on a peer.
"""
