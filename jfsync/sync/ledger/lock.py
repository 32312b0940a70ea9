"""The ledger file while one process holds it: the writer lock, the refusal at open, its identity,
its WAL checkpoints.

:func:`take_writer_lock` makes one process the only writer of a ledger (an exclusive ``flock``
on ``<ledger>.lock``): each keeps decoded state in memory between transactions, which another
writer would make stale. :func:`check_ledger_file` refuses, before SQLite opens it, an existing
file that is not an SQLite database (SQLite would take an empty file for a new ledger), using
the header test :func:`sqlite_header_problem` that ``jfsync check`` shares. :class:`LedgerFile`
holds the lock and the file's (device, inode) for as long as the ledger is open, and tells,
before every write transaction, whether the path still names that file.

:class:`WalCheckpointer` copies the WAL back into the file off the live path: SQLite's own
automatic checkpoint runs inside whichever commit takes the WAL past 1,000 pages, on the
ledger's thread and under its lock, so a live event's apply waited 5-20 ms for it about once
a second under load. The checkpointer runs PASSIVE checkpoints on a connection and a thread
of its own (SQLite releases the GIL while it copies), at the same threshold or once writes
pause, never waiting for or blocking the ledger's writer.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from jfsync.sync.ledger.errors import LedgerFileError, LedgerFileLostError, LedgerInUseError
from jfsync.sync.ledger.schema import sqlite_uri

logger = logging.getLogger(__name__)

#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
#: The length of the SQLite database header.
SQLITE_HEADER_BYTES = 100
#: How long the checkpointer lets writes gather after one it was told of before it looks at
#: the WAL (:class:`WalCheckpointer`).
CHECKPOINT_GATHER_S = 0.1
#: Frames of the WAL not yet copied that make a checkpoint due (SQLite's own threshold).
CHECKPOINT_PAGES = 1000
#: How long writes must pause before fewer frames than that are copied.
CHECKPOINT_IDLE_S = 1.0
#: How many times the checkpointer looks again, a pause apart, for the frames of the write
#: it was told of (told before the transaction ran, it may find nothing committed yet).
IDLE_LOOKS = 5
#: SQLite's own automatic checkpoint, kept as the bound on the WAL (the ledger's connection
#: sets it, ``PRAGMA wal_autocheckpoint``; SQLite's default is 1,000): a commit that takes the
#: WAL past this many frames checkpoints inline. SQLite starts writing the WAL from its start
#: again only when a transaction begins with every frame copied, which a checkpoint on
#: another connection cannot see to while writes never pause (a reconcile, a long burst);
#: then this one does, copying only what the checkpointer had not copied yet.
WAL_AUTOCHECKPOINT_PAGES = 2000


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
    :meth:`remember` records the identity of the file SQLite opened and starts its
    :class:`WalCheckpointer`; :meth:`verify` (before every write transaction) raises
    LedgerFileLostError once the path names another file or none, telling every
    :attr:`observers` callback why, once, and otherwise tells the checkpointer a write is
    coming; :meth:`release` stops the checkpointer and gives up the lock. An in-memory ledger
    has no file: nothing is locked, checked or checkpointed.
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
        #: Copies the WAL back into the file off the ledger's thread, while open.
        self.checkpointer: WalCheckpointer | None = None

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
            if self.checkpointer is None:
                self.checkpointer = WalCheckpointer(self.path)
                self.checkpointer.start()

    def release(self) -> None:
        """Stop the checkpointer and give up the writer lock (idempotent)."""
        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
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
                if self.checkpointer is not None:
                    self.checkpointer.written()
                return
            self._lost = problem
            for observer in list(self.observers):
                try:
                    observer(problem)
                except Exception:
                    logger.exception("telling about the lost ledger file failed")
        raise LedgerFileLostError(self._lost)


class WalCheckpointer:
    """PASSIVE checkpoints of one ledger file, on a thread and a connection of their own.

    :meth:`start` opens the connection (to the file SQLite already opened at ``path``) and the
    thread; :meth:`written` tells it that a write transaction is under way (cheap: it sets an
    event); :meth:`stop` ends the thread and closes the connection (idempotent).

    When to copy: :attr:`gather_s` after a write it was told of, it reads how many frames of
    the WAL are not copied yet (:meth:`pending`, from the header of SQLite's shared-memory
    WAL index, ``<ledger>-shm``; a documented part of the file format) and checkpoints once
    they reach :attr:`pages` (SQLite's own threshold), or once writes paused for
    :attr:`idle_s`. Copying more often would write the pages every transaction touches (the
    tree's upper pages) into the file over and over again. Frames a reader's older
    snapshot kept from being copied are tried again once writes pause. SQLite's automatic
    checkpoint (:data:`WAL_AUTOCHECKPOINT_PAGES`) bounds the WAL while writes never pause,
    or should a checkpoint here fail (it is logged).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: How long after a write the WAL is looked at (the transactions right behind it
        #: commit meanwhile).
        self.gather_s = CHECKPOINT_GATHER_S
        #: Frames not yet copied that make a checkpoint due at once.
        self.pages = CHECKPOINT_PAGES
        #: How long writes must pause before fewer frames are copied.
        self.idle_s = CHECKPOINT_IDLE_S
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._shm: int | None = None
        #: Checkpoints run, and the last one's (WAL frames, frames copied) (tests read them).
        self.checkpoints = 0
        self.last: tuple[int, int] | None = None

    def start(self) -> None:
        """Open the connection and start the thread (once)."""
        if self._thread is not None:
            return
        # mode=rw: never create a file (the ledger's connection opened it already).
        uri = sqlite_uri(self.path, "mode=rw")
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._thread = threading.Thread(
            target=self._run, name=f"jfsync-ledger-checkpoint:{self.path}", daemon=True
        )
        self._thread.start()

    def written(self) -> None:
        """A write transaction is under way: look at the WAL soon."""
        self._wake.set()

    def stop(self) -> None:
        """End the thread (after the checkpoint under way, if any) and close the connection."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake.set()
            thread.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        shm, self._shm = self._shm, None
        if shm is not None:
            os.close(shm)

    def pending(self) -> int | None:
        """Frames of the WAL not yet copied into the file (None: cannot tell).

        The WAL index header (``<ledger>-shm``, in the host's byte order) holds the last
        valid frame at offset 16 (``mxFrame``) and the checkpoint information, whose first
        field is the count of frames copied (``nBackfill``), at offset 96.
        """
        if self._shm is None:
            try:  # SQLite makes it at the first transaction in WAL mode
                self._shm = os.open(f"{self.path}-shm", os.O_RDONLY)
            except OSError:
                return None  # then every look at the WAL checkpoints
        try:
            header = os.pread(self._shm, 100, 0)
        except OSError:
            return None
        if len(header) < 100:
            return None
        last = int.from_bytes(header[16:20], sys.byteorder)
        copied = int.from_bytes(header[96:100], sys.byteorder)
        return max(0, last - copied)

    def _due(self) -> bool:
        """After a write: tell whether to checkpoint now (enough frames, or writes paused
        with frames left), or wait for the next write (False; also when stopping)."""
        pending = self.pending()
        if pending is None or pending >= self.pages:
            return True
        # Too little to copy yet, or the transaction that woke us has not committed (then
        # nothing is pending yet): look again after the next write, or once writes paused,
        # a few times while there is nothing to copy.
        for _ in range(IDLE_LOOKS):
            if self._wake.wait(self.idle_s) or self._stopping.is_set():
                return False
            if self.pending() != 0:
                return True
        return False

    def checkpoint(self) -> tuple[int, int]:
        """Run one PASSIVE checkpoint now, on the calling thread: (WAL frames, frames copied)."""
        conn = self._conn
        if conn is None:
            raise LedgerFileError(f"the checkpointer of {self.path} is not started")
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        result = (int(row[1]), int(row[2])) if row is not None else (0, 0)
        self.checkpoints += 1
        self.last = result
        return result

    def _run(self) -> None:
        # Looked at before every wait: stop() sets the flag, then the wake, and a clear() of
        # the wake below may come just after both (a stop during the gather), so the wake
        # alone cannot tell the thread to end (it waited for a write forever, and closing the
        # ledger with it).
        while not self._stopping.is_set():
            self._wake.wait()
            if self._stopping.wait(self.gather_s):
                return
            self._wake.clear()
            if not self._due():
                continue
            try:
                frames, copied = self.checkpoint()
            except sqlite3.Error as err:
                logger.warning("checkpoint of the ledger %s failed: %s", self.path, err)
                continue
            if copied < frames:
                # A reader holds an older snapshot: try again (once writes pause).
                self._wake.set()
