"""Checks of the ledger's path and file before anything opens it: one line per problem.

:func:`check_ledger_file` is what ``jfsync check --offline`` and ``jfsync run`` (before it
opens the ledger) ask about the configured ``ledger`` path: that its directory exists and
this user can create files in it (the ledger, its ``-wal``, ``-shm`` and ``.lock``), that the
path is not a directory, and, when the file exists, that it can be read and written and is a
sound SQLite database holding a jfsync ledger of a schema version this jfsync knows
(:data:`jfsync.sync.ledger.schema.LATEST_VERSION`). The file is opened read-only and never modified.
Every problem is one line naming the key, the path, what is wrong and the fix; warnings (a
ledger other users can read: it holds every user's token) do not stop anything.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path

from jfsync.sync.ledger.lock import SQLITE_HEADER_BYTES, sqlite_header_problem
from jfsync.sync.ledger.schema import LATEST_VERSION, sqlite_uri

#: Tables every jfsync ledger has from schema version 1 on.
LEDGER_TABLES = frozenset({"meta", "servers", "outbox", "tokens", "canonical", "last_known"})
#: How long the read-only check waits for a writer's lock (a running jfsync) before giving up.
BUSY_TIMEOUT_S = 5.0
#: Permission bits the ledger, its WAL and shared-memory files get: the owner's only.
LEDGER_FILE_MODE = 0o600


@dataclass
class LedgerFileReport:
    """What the check found: blocking problems and warnings, one line each."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The schema version found (None: no file yet, or it could not be read).
    schema_version: int | None = None

    @property
    def ok(self) -> bool:
        """Tell whether ``jfsync run`` could open the ledger."""
        return not self.problems


def check_ledger_file(path: str | Path, *, key: str = "ledger") -> LedgerFileReport:
    """Check the ledger at ``path`` (see the module docstring); never modifies anything."""
    report = LedgerFileReport()
    text = str(path)
    if text == ":memory:":
        return report
    ledger = Path(path)
    where = f"{key}: {ledger}"
    parent = ledger.parent
    if ledger.is_dir():
        report.problems.append(
            f"{where} is a directory; give the path of a file in it, e.g. {ledger / 'jfsync.db'}"
        )
        return report
    if not parent.exists():
        report.problems.append(
            f"{where}: its directory {parent} does not exist; create it (mkdir -p {parent}) "
            "or point ledger at an existing directory"
        )
        return report
    if not parent.is_dir():
        report.problems.append(
            f"{where}: {parent} is not a directory; point ledger at a file in a directory"
        )
        return report
    if not os.access(parent, os.W_OK | os.X_OK):
        report.problems.append(
            f"{where}: this user (uid {os.geteuid()}) cannot create files in {parent} (the "
            "ledger needs its -wal, -shm and .lock files beside it); make the directory "
            "writable or point ledger elsewhere"
        )
        return report
    if not ledger.exists():
        if ledger.is_symlink():
            report.problems.append(
                f"{where} is a symbolic link to a missing file; remove the link or fix its target"
            )
        return report  # a new ledger is created on first run
    if not ledger.is_file():
        report.problems.append(f"{where} is not a regular file; give the path of a file")
        return report
    if not os.access(ledger, os.R_OK | os.W_OK):
        report.problems.append(
            f"{where} is not readable and writable by this user (uid {os.geteuid()}); "
            f"fix its owner or mode (chmod 600 {ledger})"
        )
        return report
    _check_content(ledger, where, report)
    if report.ok:
        _check_mode(ledger, where, report)
    return report


def _check_mode(ledger: Path, where: str, report: LedgerFileReport) -> None:
    mode = stat.S_IMODE(ledger.stat().st_mode)
    if mode & 0o077:
        report.warnings.append(
            f"{where} can be read by other users (mode {mode:04o}) and holds every user's "
            f"token; restrict it: chmod 600 {ledger}"
        )


def _check_content(ledger: Path, where: str, report: LedgerFileReport) -> None:
    fix = "restore it from a backup, or move it away to start a new ledger"
    try:
        with ledger.open("rb") as handle:
            header = handle.read(SQLITE_HEADER_BYTES)
    except OSError as err:
        report.problems.append(f"{where} cannot be read ({err.strerror}); {fix}")
        return
    problem = sqlite_header_problem(header)
    if problem is not None:
        report.problems.append(f"{where} {problem}; {fix}")
        return
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid_for = int.from_bytes(header[92:96], "big")
    changes = int.from_bytes(header[24:28], "big")
    size = ledger.stat().st_size
    wal = Path(f"{ledger}-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    if pages and valid_for == changes and size < pages * page_size and not has_wal:
        report.problems.append(f"{where} is truncated ({size} of {pages * page_size} bytes); {fix}")
        return
    try:
        _read_schema(ledger, where, fix, report)
    except sqlite3.Error as err:
        report.problems.append(f"{where} is damaged ({_sqlite_text(err)}); {fix}")


def _read_schema(ledger: Path, where: str, fix: str, report: LedgerFileReport) -> None:
    # Without a WAL beside it (a clean stop) the file is all there is: read it as immutable,
    # so not even the -wal and -shm files a read-only open would create appear.
    wal = Path(f"{ledger}-wal")
    flags = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    uri = sqlite_uri(str(ledger.resolve()), flags)
    db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        damage = [str(r[0]) for r in db.execute("PRAGMA quick_check(3)")]
    finally:
        db.close()
    if damage != ["ok"]:
        report.problems.append(f"{where} is damaged ({'; '.join(damage)[:200]}); {fix}")
        return
    report.schema_version = version
    if version > LATEST_VERSION:
        report.problems.append(
            f"{where} was written by a newer jfsync (schema {version}; this one knows up to "
            f"{LATEST_VERSION}); upgrade jfsync, or restore a backup made by this version"
        )
        return
    if version == 0:
        if tables:
            report.problems.append(
                f"{where} is an SQLite database but not a jfsync ledger (no schema version, "
                f"tables {', '.join(sorted(tables)[:5])}); point ledger at another file"
            )
        return
    missing = LEDGER_TABLES - tables
    if missing:
        report.problems.append(
            f"{where} says schema {version} but lacks tables {', '.join(sorted(missing))}; {fix}"
        )


def _sqlite_text(err: sqlite3.Error) -> str:
    text = str(err) or type(err).__name__
    return text[:200]
