"""The ledger: what every server holds, what each user last did, and what each peer is still owed.

One SQLite file (aiosqlite) holds the canonical state per user and item, the last-known state per
server, the pending echoes, the id maps and the durable outbox. ``store`` is the ledger itself
and its transactions; ``batch`` applies observations, compare reads, intents and acks;
``writer`` is the only writer of the cached tables and ``cache`` the state it keeps between
transactions; ``policy`` what may be owed to whom (the merge policy in force, each person's
choices); ``outbox`` the rows owed and their queries; ``maps`` the id maps; ``clock`` the
hybrid clock and read tickets; ``codec`` the column encodings; ``lock`` the file while it is
open; ``errors`` the errors; ``schema`` creates and migrates the tables; ``file`` checks the
file on disk before anything opens it. Importers use this package's face, not the modules
behind it.
"""

from jfsync.sync.ledger.batch import Applied, Observation, Outcome, Source
from jfsync.sync.ledger.cache import STATE_CACHE_PAIRS
from jfsync.sync.ledger.clock import SEEN_KEEP_TICKETS, SEEN_KEYS_MAX
from jfsync.sync.ledger.errors import (
    LedgerError,
    LedgerFileError,
    LedgerFileLostError,
    LedgerInUseError,
)
from jfsync.sync.ledger.lock import (
    SQLITE_HEADER_BYTES,
    SQLITE_MAGIC,
    check_ledger_file,
    sqlite_header_problem,
    take_writer_lock,
)
from jfsync.sync.ledger.maps import ItemMapping
from jfsync.sync.ledger.outbox import OutboxRow
from jfsync.sync.ledger.store import Ledger, ResetHold

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
