"""jfsync keeps the per-user data of several Jellyfin servers identical.

Where an event goes, folder by folder: ``jellyfin/`` is the transport (REST client, websocket,
wire models, the write plan); ``sync/`` is the replication core, in the order an event travels:
``subscriber`` (one socket per server and user) → ``intake`` (events become observations) →
``identity``/``index`` (which canonical item) → ``ledger/`` (echo rule, diff, merge, outbox rows,
one transaction) → ``delivery`` (one pusher per peer writes the outbox; the only write path).
``catchup``/``reconcile`` feed the same ledger from scans, ``sessions`` from playback.
``service.py`` wires one of each per configured server; ``ops/`` is what an operator touches
(status server and page, metrics, alerts, the commands); ``emulator/`` is the Jellyfin stand-in
the tests and the demo run against. ``docs/architecture.md`` walks through it in full.
"""

__version__ = "0.1.0"
