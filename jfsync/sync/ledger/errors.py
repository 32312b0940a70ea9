"""The ledger's errors: misuse, a file that is not a ledger, a file in use or lost while open.

They live apart from the modules that raise them so that every module of the package (and every
importer, through the package face) can name them without importing the ledger itself.
"""

from __future__ import annotations

from jfsync.errors import JfsyncError


class LedgerError(JfsyncError):
    """The ledger was used wrongly (closed, unknown server) or its file is unusable."""


class LedgerInUseError(LedgerError):
    """Another jfsync process has the ledger file open."""


class LedgerFileError(LedgerError):
    """The file at the ledger path is not a ledger (empty, not SQLite): refused, never reused."""


class LedgerFileLostError(LedgerError):
    """The file jfsync has open is no longer the file at the ledger path (deleted, replaced)."""
