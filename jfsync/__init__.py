"""jfsync keeps the per-user data of several Jellyfin servers identical.

Data flow: Jellyfin websocket ``UserDataChanged`` events and REST scans feed a last-writer-wins
ledger in SQLite; the ledger queues writes in a durable outbox per peer; pushers write them to
every other server. See ``docs/`` and the README for the operating guide.
"""

__version__ = "0.1.0"
