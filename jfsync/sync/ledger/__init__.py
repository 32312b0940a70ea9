"""The ledger: what every server holds, what each user last did, and what each peer is still owed.

One SQLite file (aiosqlite) holds the canonical state per user and item, the last-known state per
server, the pending echoes, the id maps and the durable outbox. ``store`` is the ledger itself and
its transactions; ``schema`` creates and migrates the tables; ``file`` checks the file on disk
before anything opens it. Importers use this package's face, not the modules behind it.
"""

from jfsync.sync.ledger.store import (
    SEEN_KEEP_TICKETS,
    SEEN_KEYS_MAX,
    SQLITE_HEADER_BYTES,
    SQLITE_MAGIC,
    STATE_CACHE_PAIRS,
    Applied,
    ItemMapping,
    Ledger,
    LedgerError,
    LedgerFileError,
    LedgerFileLostError,
    LedgerInUseError,
    Observation,
    OutboxRow,
    Outcome,
    ResetHold,
    Source,
    check_ledger_file,
    sqlite_header_problem,
    take_writer_lock,
)

__all__ = [
    "SEEN_KEEP_TICKETS",
    "SEEN_KEYS_MAX",
    "SQLITE_HEADER_BYTES",
    "SQLITE_MAGIC",
    "STATE_CACHE_PAIRS",
    "Applied",
    "ItemMapping",
    "Ledger",
    "LedgerError",
    "LedgerFileError",
    "LedgerFileLostError",
    "LedgerInUseError",
    "Observation",
    "OutboxRow",
    "Outcome",
    "ResetHold",
    "Source",
    "check_ledger_file",
    "sqlite_header_problem",
    "take_writer_lock",
]
