"""The ledger file while one process holds it: the writer lock, the refusal at open, its identity.

:func:`take_writer_lock` makes one process the only writer of a ledger (an exclusive ``flock``
on ``<ledger>.lock``): each keeps decoded state in memory between transactions, which another
writer would make stale. :func:`check_ledger_file` refuses, before SQLite opens it, an existing
file that is not an SQLite database (SQLite would take an empty file for a new ledger), using
the header test :func:`sqlite_header_problem` that ``jfsync check`` shares. :class:`LedgerFile`
holds the lock and the file's (device, inode) for as long as the ledger is open, and tells,
before every write transaction, whether the path still names that file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from jfsync.sync.ledger.errors import LedgerFileError, LedgerFileLostError, LedgerInUseError

logger = logging.getLogger(__name__)

#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
#: The length of the SQLite database header.
SQLITE_HEADER_BYTES = 100


def sqlite_header_problem(header: bytes) -> str | None:
    """What is wrong with the first bytes of a file that should be a ledger (None: nothing),
    worded to follow the file's name: "<ledger> is not an SQLite database"."""
    if not header:
        return "is an empty (0-byte) file, not a ledger"
    if not header.startswith(SQLITE_MAGIC):
        return "is not an SQLite database"
    if len(header) < SQLITE_HEADER_BYTES:
        return f"is truncated ({len(header)} bytes)"
    page_size = int.from_bytes(header[16:18], "big")
    if page_size != 1 and (page_size < 512 or page_size > 32768 or page_size & (page_size - 1)):
        return f"has a damaged SQLite header (page size {page_size})"
    return None


def check_ledger_file(path: str | Path) -> None:
    """Refuse an existing file at ``path`` that is not an SQLite database; a missing one is fine.

    SQLite takes an empty file for a new database, so a ledger truncated to 0 bytes (a full
    disk, a botched copy) or replaced by something else would silently start a new ledger,
    and the next first-contact merge bring back what users had removed. Raises
    LedgerFileError with one line naming the file, what is wrong and the fix.
    """
    path = str(path)
    if path == ":memory:":
        return
    try:
        with open(path, "rb") as handle:
            header = handle.read(SQLITE_HEADER_BYTES)
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise LedgerFileError(
            f"the ledger {path} is a directory, not a file; point ledger: at a file"
        ) from None
    except OSError as err:
        raise LedgerFileError(f"cannot read the ledger {path}: {err.strerror or err}") from None
    problem = sqlite_header_problem(header)
    if problem is not None:
        raise LedgerFileError(
            f"the ledger {path} {problem}; restore it from a backup, or move it away to start "
            "a new ledger"
        )


def file_identity(path: str) -> tuple[int, int]:
    """(device, inode) of the file at ``path``."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def take_writer_lock(path: str) -> int | None:
    """Take the single-writer lock of the ledger at ``path``; return the descriptor holding it.

    The lock is an exclusive ``flock`` on ``<ledger>.lock`` (with the holder's pid in it),
    held while the ledger is open and released by the kernel when the process ends, however
    it ends. One writer only: each process keeps decoded ledger state in memory between
    transactions (:class:`jfsync.sync.ledger.cache.StateCache`), which another writer's
    changes would make stale. Raises LedgerInUseError naming the holder. On systems without
    ``fcntl`` nothing is locked.
    """
    if sys.platform == "win32":  # pragma: no cover - not a supported platform for the service
        return None
    import fcntl

    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LedgerInUseError(
            f"the ledger {path} is in use by another jfsync process (pid {holder}); stop "
            "it first, or use --dry-run (it works on a copy)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class LedgerFile:
    """The ledger file one :class:`~jfsync.sync.ledger.store.Ledger` has open.

    :meth:`claim` takes the writer lock and refuses a file that is not a ledger;
    :meth:`remember` records the identity of the file SQLite opened; :meth:`verify` (before
    every write transaction) raises LedgerFileLostError once the path names another file or
    none, telling every :attr:`observers` callback why, once. An in-memory ledger has no file:
    nothing is locked or checked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: Told, once, why the ledger stopped taking writes (the service stops on it).
        self.observers: list[Callable[[str], None]] = []
        #: The descriptor holding the single-writer lock, while open.
        self._lock: int | None = None
        #: (device, inode) of the file opened.
        self._identity: tuple[int, int] | None = None
        #: Why the file at the path is no longer the one open (then nothing more is written).
        self._lost: str | None = None

    @property
    def in_memory(self) -> bool:
        """Whether the ledger is SQLite's ``:memory:`` (no file at all)."""
        return self.path == ":memory:"

    def claim(self) -> bool:
        """Take the writer lock, then refuse a file that is not a ledger; tell if it is new."""
        if self.in_memory:
            return False
        self._lock = take_writer_lock(self.path)
        try:
            check_ledger_file(self.path)
            return not os.path.exists(self.path)
        except BaseException:
            self.release()
            raise

    def remember(self) -> None:
        """Record the identity of the file now open (after SQLite created or opened it)."""
        if not self.in_memory:
            self._identity = file_identity(self.path)
            self._lost = None

    def release(self) -> None:
        """Give up the writer lock (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)  # closing the descriptor releases the lock

    def problem(self) -> str | None:
        """Why the file at the path is not the file open, or None (one ``os.stat``)."""
        if self._lost is not None:
            return self._lost
        if self._identity is None:
            return None
        try:
            identity = file_identity(self.path)
        except FileNotFoundError:
            return (
                f"the ledger file {self.path} was deleted while jfsync had it open; nothing "
                "more is written to it (restore the file and restart jfsync, or restart to "
                "begin a new ledger)"
            )
        except OSError as err:
            return f"cannot check the ledger file {self.path}: {err.strerror or err}"
        if identity != self._identity:
            return (
                f"the ledger file {self.path} was replaced by another file while jfsync had "
                "it open; nothing more is written to either (restart jfsync to use the file "
                "now at that path)"
            )
        return None

    def verify(self) -> None:
        """Raise LedgerFileLostError when the path no longer names the file open.

        The first time, every :attr:`observers` callback is told why; from then on every
        write is refused, even if the file comes back.
        """
        if self._lost is None:
            problem = self.problem()
            if problem is None:
                return
            self._lost = problem
            for observer in list(self.observers):
                try:
                    observer(problem)
                except Exception:
                    logger.exception("telling about the lost ledger file failed")
        raise LedgerFileLostError(self._lost)
