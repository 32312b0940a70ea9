"""The id maps: servers, canonical user and item keys, and which server id is which of them.

Servers are config names, users and items canonical keys; each has an integer id in the file
(``servers``, ``users``, ``items``), and ``server_users`` / ``server_items`` record which of a
server's own ids is which canonical user or item (with type, path and provider ids for identity
matching). :class:`IdMaps` is the one code that writes those tables; it keeps the ids it handed
out and, bounded, which servers have each user and map each item, and forgets them itself
whenever it writes a mapping (and, told by the ledger, when a transaction did not commit). A
first match may set a server's mappings aside on the connection (a TEMP table, outside the file)
and record them all in one transaction (:meth:`IdMaps.stage_items`, :meth:`IdMaps.map_staged`).
:func:`migrate_map_keys` moves positional ``users.map`` keys to stable ones at open.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from jfsync.sync.ledger.codec import CHUNK, Key, Pair, chunks, fetch, insert_flat, marks
from jfsync.sync.ledger.errors import LedgerError
from jfsync.sync.ledger.outbox import OutboxRow
from jfsync.sync.ledger.schema import write_transaction
from jfsync.sync.users import is_positional_map_key, plan_map_key_migration

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemMapping:
    """How one server item maps to a canonical item, with what identity matching needs."""

    remote_id: str
    item: str
    item_type: str | None = None
    path: str | None = None
    provider_ids: dict[str, str] | None = None


#: Item ids kept in memory at most (beyond, the kept ids are dropped and read again as needed).
ITEM_ID_LIMIT = 50_000


class IdMaps:
    """Ids of servers, users and items, and the server-side id maps, for one open ledger.

    Ids of users are kept once read or created, ids of items up to :data:`ITEM_ID_LIMIT`; which
    servers have each user (``members``) and map each item (``mapped``, bounded to ``limit``
    items) is kept until a mapping changes. Call :meth:`forget_uncommitted` after a transaction
    that did not commit: ids it created no longer exist and what it read may not have been
    committed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._server_ids: dict[str, int] = {}
        self._server_names: dict[int, str] = {}
        self._user_ids: dict[str, int] = {}
        self._item_ids: dict[str, int] = {}
        #: User id -> the servers that have that user.
        self._members: dict[int, frozenset[int]] = {}
        #: Indexed servers (None: not read yet) and, per item id, the indexed servers mapping
        #: it (emptied when it would pass ``limit`` items).
        self._indexed: frozenset[int] | None = None
        self._mapped: dict[int, frozenset[int]] = {}

    # ------------------------------------------------------------------ servers

    def register_servers(self, db: sqlite3.Connection, names: Iterable[str]) -> None:
        """Add the configured servers (in the caller's transaction)."""
        db.executemany(
            "INSERT INTO servers(name) VALUES (?) ON CONFLICT(name) DO NOTHING",
            [(name,) for name in names],
        )

    def load_servers(self, db: sqlite3.Connection) -> None:
        """Learn every server's id."""
        for sid, name in fetch(db, "SELECT id, name FROM servers"):
            self._server_ids[name] = sid
            self._server_names[sid] = name

    def configure_servers(self, db: sqlite3.Connection, names: Iterable[str]) -> None:
        """The configured servers changed (a config reload): add the new ones and learn their
        ids, in the caller's transaction; which of them are indexed is read again."""
        self.register_servers(db, names)
        self.load_servers(db)
        self._forget_mappings()

    @property
    def names(self) -> Mapping[int, str]:
        """Server names by id."""
        return self._server_names

    def sid(self, server: str) -> int:
        """The id of the configured server ``server``; LedgerError for an unknown one."""
        try:
            return self._server_ids[server]
        except KeyError:
            raise LedgerError(
                f"unknown server {server!r}; the ledger knows {', '.join(self._server_ids)}"
            ) from None

    def sid_of(self, server: str) -> int | None:
        """The id of ``server``, or None when the ledger does not know it."""
        return self._server_ids.get(server)

    # ------------------------------------------------------------------ users and items

    def forget_uncommitted(self) -> None:
        """After a transaction that did not commit: forget ids and mappings it may have made."""
        self._user_ids.clear()
        self._item_ids.clear()
        self._forget_mappings()

    def ensure_ids(
        self,
        db: sqlite3.Connection,
        table: Literal["users", "items"],
        keys: Iterable[str],
        created: set[int] | None = None,
    ) -> dict[str, int]:
        """The ids of canonical user or item keys, creating those the file lacks.

        The ids created are added to ``created``: nothing in the file refers to them yet (ids
        are never reused), so their state need not be read.
        """
        known = self._user_ids if table == "users" else self._item_ids
        wanted = dict.fromkeys(keys)  # in the caller's order: new ids follow it
        missing = [k for k in wanted if k not in known]
        if table == "items" and len(known) + len(missing) > ITEM_ID_LIMIT:
            # Start the item ids over rather than keep one per item ever touched (a first
            # reconcile touches the whole library: ~30 MB at 200k items): read them again.
            known.clear()
            missing = list(wanted)
        if missing:
            # Ids only grow and are never reused (keys are never deleted), and no other writer
            # runs inside this write transaction: the rows above the highest id before are
            # exactly the keys it inserted. The other keys were in the file already.
            highest = int(fetch(db, f"SELECT COALESCE(MAX(id), 0) FROM {table}")[0][0])  # noqa: S608
            changes = db.total_changes
            insert_flat(
                db,
                f"INSERT INTO {table}(key) VALUES (?) ON CONFLICT(key) DO NOTHING",  # noqa: S608
                missing,
                1,
            )
            inserted = db.total_changes - changes
            top = int(fetch(db, f"SELECT COALESCE(MAX(id), 0) FROM {table}")[0][0])  # noqa: S608
            if inserted == len(missing) and top == highest + inserted:
                # Every key was new, and the ids above the highest are exactly as many as the
                # rows inserted: each row took the next id (SQLite's max + 1), in the order
                # inserted, which is the order of ``missing``. No need to read them back.
                new_ids = range(highest + 1, top + 1)
                known.update(zip(missing, new_ids, strict=True))
                if created is not None:
                    created.update(new_ids)
                older: list[str] = []
            else:
                rows = fetch(db, f"SELECT key, id FROM {table} WHERE id > ?", (highest,))  # noqa: S608
                for key, rid in rows:
                    known[key] = rid
                    if created is not None:
                        created.add(rid)
                older = [k for k in missing if k not in known]
            for chunk in chunks(older, CHUNK):
                rows = fetch(
                    db,
                    f"SELECT key, id FROM {table} WHERE key IN ({marks(len(chunk))})",  # noqa: S608
                    chunk,
                )
                for key, rid in rows:
                    known[key] = rid
        return {k: known[k] for k in wanted}

    def user_id(self, db: sqlite3.Connection, user: str) -> int:
        """The id of the canonical user ``user``, created if new."""
        return (self.ensure_ids(db, "users", [user]))[user]

    def known_pair(self, user: str, item: str) -> Pair | None:
        """The (user, item) ids when this process knows both, else None (no SQL)."""
        uid = self._user_ids.get(user)
        iid = self._item_ids.get(item)
        return None if uid is None or iid is None else (uid, iid)

    def pair(self, db: sqlite3.Connection, user: str, item: str) -> Pair | None:
        """The (user, item) ids, or None when the file has no such user or item."""
        known = self.known_pair(user, item)
        if known is not None:
            return known
        uid = self.existing_user_id(db, user)
        irows = list(fetch(db, "SELECT id FROM items WHERE key=?", (item,)))
        if uid is None or not irows:
            return None
        return uid, int(irows[0][0])

    def existing_user_id(self, db: sqlite3.Connection, user: str) -> int | None:
        """The id of the canonical user ``user``, or None when the file has none (a read:
        nothing is created)."""
        uid = self._user_ids.get(user)
        if uid is not None:
            return uid
        rows = list(fetch(db, "SELECT id FROM users WHERE key=?", (user,)))
        return int(rows[0][0]) if rows else None

    def row_keys(self, db: sqlite3.Connection, rows: Sequence[OutboxRow]) -> list[Key]:
        """The (user, item, peer) ids of each row, in order."""
        sids = {peer: self.sid(peer) for peer in {r.peer for r in rows}}
        users = self._user_ids
        items = self._item_ids
        try:  # (a pusher's rows: ids this process knows, nearly always)
            return [(users[r.user], items[r.item], sids[r.peer]) for r in rows]
        except KeyError:
            users = self.ensure_ids(db, "users", [r.user for r in rows])
            items = self.ensure_ids(db, "items", [r.item for r in rows])
        return [(users[r.user], items[r.item], sids[r.peer]) for r in rows]

    def unmapped_items(self, db: sqlite3.Connection, items: Sequence[str]) -> list[tuple[int, str]]:
        """(id, key) of the canonical items among ``items`` that no server maps, key order."""
        found: list[tuple[int, str]] = []
        for chunk in chunks(sorted(set(items)), CHUNK):
            rows = fetch(
                db,
                f"SELECT i.id, i.key FROM items i WHERE i.key IN ({marks(len(chunk))}) "  # noqa: S608
                "AND NOT EXISTS (SELECT 1 FROM server_items s WHERE s.item = i.id)",
                chunk,
            )
            found += [(int(r[0]), str(r[1])) for r in rows]
        return found

    # ------------------------------------------------------------------ mappings: writes

    def map_user(
        self, db: sqlite3.Connection, sid: int, remote_id: str, user: str, name: str | None
    ) -> None:
        """Record that ``remote_id`` on server ``sid`` is the canonical user ``user``."""
        self._forget_mappings()
        uid = self.user_id(db, user)
        db.execute("DELETE FROM server_users WHERE server=? AND user=?", (sid, uid))
        db.execute(
            "INSERT OR REPLACE INTO server_users(server, remote_id, user, name) "
            "VALUES (?, ?, ?, ?)",
            (sid, remote_id, uid, name),
        )

    def map_items(self, db: sqlite3.Connection, sid: int, mappings: Sequence[ItemMapping]) -> None:
        """Record ``mappings`` of server ``sid``, replacing what mapped the same items."""
        self._forget_mappings()
        ids = self.ensure_ids(db, "items", [m.item for m in mappings])
        db.executemany(
            "DELETE FROM server_items WHERE server=? AND item=?",
            [(sid, ids[m.item]) for m in mappings],
        )
        db.executemany(
            "INSERT OR REPLACE INTO server_items(server, remote_id, item, item_type, path, "
            "provider_ids) VALUES (?, ?, ?, ?, ?, ?)",
            [(sid, *_mapping_values(m, ids[m.item])) for m in mappings],
        )

    def stage_items(
        self,
        db: sqlite3.Connection,
        sid: int,
        mappings: Sequence[ItemMapping],
        *,
        fresh: bool = False,
    ) -> None:
        """Set ``mappings`` of server ``sid`` aside, to be recorded by :meth:`map_staged`.

        They go, with their item ids (created as :meth:`map_items` creates them), into a
        TEMP table of this connection (never in the ledger file, so never in its WAL);
        ``fresh`` first drops whatever an earlier pass set aside for the server and never
        recorded (one cut short). The caller's transaction holds them like any other write: a
        rollback takes them back out.
        """
        table = _staged_table(sid)
        if fresh:
            # Scratch rows: no journal on disk (a rollback still works) and no zeroing of
            # what the DROP frees (SQLite may be built with secure_delete on; Debian's is).
            db.execute("PRAGMA temp.journal_mode=MEMORY")
            db.execute("PRAGMA temp.secure_delete=OFF")
            db.execute(f"DROP TABLE IF EXISTS temp.{table}")
        db.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {table} (remote_id TEXT NOT NULL, "
            "item INTEGER NOT NULL, item_type TEXT, path TEXT, provider_ids TEXT)"
        )
        if not mappings:
            return
        ids = self.ensure_ids(db, "items", [m.item for m in mappings])
        flat: list[object] = []
        for m in mappings:
            flat += _mapping_values(m, ids[m.item])
        insert_flat(
            db,
            f"INSERT INTO temp.{table}(remote_id, item, item_type, path, provider_ids) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?)",
            flat,
            5,
        )

    def map_staged(self, db: sqlite3.Connection, sid: int, count: int) -> None:
        """Record the ``count`` mappings of server ``sid`` set aside by :meth:`stage_items`,
        as :meth:`map_items` records them (the last of two for one id or item wins), then
        drop them.

        Three SQL statements, whatever their number: a whole library's mappings land in one
        transaction, so each page of the id map's b-trees is written once however scattered
        the rows are (one transaction per few thousand rewrote most pages each time). A
        different number set aside (the connection was opened again, or a pass was cut short
        in between) raises :class:`LedgerError` and records none of them.
        """
        table = _staged_table(sid)
        exists = fetch(
            db, "SELECT 1 FROM sqlite_temp_master WHERE type='table' AND name=?", (table,)
        )
        found = int(fetch(db, f"SELECT COUNT(*) FROM temp.{table}")[0][0]) if exists else 0  # noqa: S608
        if found != count:
            raise LedgerError(
                f"{count} item mappings of server {self._server_names.get(sid, sid)!r} were set "
                f"aside for the id map but {found} are there; none is recorded (the next match "
                "writes them again)"
            )
        self._forget_mappings()
        if count:
            if self.has_index(db, sid):
                db.execute(
                    "DELETE FROM server_items WHERE server=? AND item IN "  # noqa: S608
                    f"(SELECT item FROM temp.{table})",
                    (sid,),
                )
            db.execute(
                "INSERT OR REPLACE INTO server_items(server, remote_id, item, item_type, path, "  # noqa: S608
                f"provider_ids) SELECT ?, remote_id, item, item_type, path, provider_ids "
                f"FROM temp.{table} ORDER BY rowid",
                (sid,),
            )
        db.execute(f"DROP TABLE IF EXISTS temp.{table}")

    def unmap_items(self, db: sqlite3.Connection, sid: int, remote_ids: Iterable[str]) -> None:
        """Drop the mappings of server ``sid``'s item ids ``remote_ids``."""
        self._forget_mappings()
        for chunk in chunks(sorted(set(remote_ids)), CHUNK):
            db.execute(
                f"DELETE FROM server_items WHERE server=? AND remote_id IN ({marks(len(chunk))})",  # noqa: S608
                (sid, *chunk),
            )

    def _forget_mappings(self) -> None:
        self._members.clear()
        self._indexed = None
        self._mapped.clear()

    # ------------------------------------------------------------------ mappings: reads

    def user_for(self, db: sqlite3.Connection, sid: int, remote_id: str) -> str | None:
        """The canonical user of server ``sid``'s user id, if mapped."""
        rows = fetch(
            db,
            "SELECT u.key FROM server_users s JOIN users u ON u.id = s.user "
            "WHERE s.server=? AND s.remote_id=?",
            (sid, remote_id),
        )
        return next((str(r[0]) for r in rows), None)

    def item_for(self, db: sqlite3.Connection, sid: int, remote_id: str) -> str | None:
        """The canonical item of server ``sid``'s item id, if mapped."""
        rows = fetch(
            db,
            "SELECT i.key FROM server_items s JOIN items i ON i.id = s.item "
            "WHERE s.server=? AND s.remote_id=?",
            (sid, remote_id),
        )
        return next((str(r[0]) for r in rows), None)

    def servers_with_user(self, db: sqlite3.Connection, user: str) -> set[str]:
        """The names of the servers that have the canonical user ``user``."""
        rows = fetch(
            db,
            "SELECT s.server FROM server_users s JOIN users u ON u.id = s.user WHERE u.key=?",
            (user,),
        )
        return {self._server_names[int(r[0])] for r in rows}

    def members(
        self, db: sqlite3.Connection, users: set[int], *, cached: bool = True
    ) -> dict[int, set[int]]:
        """Which servers have each of ``users`` (users no server has are left out)."""
        found: dict[int, set[int]] = {}
        missing = set(users)
        if cached:
            for uid in users:
                known = self._members.get(uid)
                if known is not None:
                    found[uid] = set(known)
                    missing.discard(uid)
        for chunk in chunks(sorted(missing), CHUNK):
            for uid, sid in fetch(
                db,
                f"SELECT user, server FROM server_users WHERE user IN ({marks(len(chunk))})",  # noqa: S608
                chunk,
            ):
                found.setdefault(int(uid), set()).add(int(sid))
        if cached:
            for uid in missing:
                self._members[uid] = frozenset(found.get(uid, ()))
        return found

    def has_index(self, db: sqlite3.Connection, sid: int) -> bool:
        """Tell whether server ``sid``'s library is indexed (it maps items)."""
        rows = fetch(db, "SELECT 1 FROM server_items WHERE server=? LIMIT 1", (sid,))
        return bool(list(rows))

    def indexed(
        self, db: sqlite3.Connection, servers: Iterable[int], *, cached: bool = True
    ) -> frozenset[int]:
        """The ones of ``servers`` whose library is indexed (:meth:`mappings` has more)."""
        indexed = self._indexed if cached else None
        if indexed is None:
            indexed = frozenset([sid for sid in sorted(servers) if self.has_index(db, sid)])
            if cached:
                self._indexed = indexed
        return indexed

    def mappings(
        self,
        db: sqlite3.Connection,
        items: set[int],
        servers: Iterable[int],
        *,
        cached: bool = True,
    ) -> tuple[frozenset[int], dict[int, set[int]]]:
        """The indexed ones of ``servers``, and which of ``items`` each of them maps.

        A server whose library is indexed but that does not map an item does not have it;
        servers without an index (identical-id identity) are taken to have every item.
        """
        indexed = self.indexed(db, servers, cached=cached)
        mapped: dict[int, set[int]] = {}
        if not indexed:
            return indexed, mapped
        if cached:
            # Items by the (shared) set of servers that map them: a bulk apply's items are
            # mostly mapped by the same servers, so each server's set is filled in one call.
            known = self._mapped.get
            missing: list[int] = []
            by_servers: dict[frozenset[int], list[int]] = {}
            for iid in items:
                servers_of = known(iid)
                if servers_of is None:
                    missing.append(iid)
                    continue
                group = by_servers.get(servers_of)
                if group is None:
                    group = by_servers[servers_of] = []
                group.append(iid)
            for servers_of, group in by_servers.items():
                for sid in servers_of:
                    target = mapped.get(sid)
                    if target is None:
                        target = mapped[sid] = set()
                    target.update(group)
            wanted = set(missing)
        else:
            wanted = set(items)
        have: dict[int, set[int]] = {}
        for sid in sorted(indexed):
            for chunk in chunks(sorted(wanted), CHUNK):
                in_chunk = marks(len(chunk))
                for (iid,) in fetch(
                    db,
                    f"SELECT item FROM server_items WHERE server=? AND item IN ({in_chunk})",  # noqa: S608
                    (sid, *chunk),
                ):
                    mapped.setdefault(sid, set()).add(int(iid))
                    have.setdefault(int(iid), set()).add(sid)
        if cached:
            if len(self._mapped) + len(wanted) > self.limit:
                self._mapped.clear()  # bounded like the state cache (a library has many items)
            # Most items are mapped by the same servers: one shared set per combination.
            shared: dict[frozenset[int], frozenset[int]] = {}
            for iid in wanted:
                servers_of = frozenset(have.get(iid, ()))
                self._mapped[iid] = shared.setdefault(servers_of, servers_of)
        return indexed, mapped


def _mapping_values(m: ItemMapping, item_id: int) -> tuple[object, ...]:
    """``m``'s values as ``server_items`` holds them after its server: remote id, item id,
    type, path, provider ids (one JSON text, keys sorted)."""
    provider_ids = json.dumps(m.provider_ids, sort_keys=True) if m.provider_ids else None
    return (m.remote_id, item_id, m.item_type, m.path, provider_ids)


def _staged_table(sid: int) -> str:
    """The TEMP table of the mappings of server ``sid`` set aside (:meth:`IdMaps.stage_items`)."""
    return f"jfsync_staged_items_{int(sid)}"


def migrate_map_keys(
    db: sqlite3.Connection, path: str, entries: Sequence[Mapping[str, str]]
) -> None:
    """Give people of positional ``users.map`` keys (``map:0``) their stable keys.

    A one-time data migration, run at open with the config's map at hand (SQL alone cannot
    derive the keys: they come from the config's entries). Each old key goes to the entry
    naming the accounts the ledger recorded for it (:func:`plan_map_key_migration`), whatever
    position that entry has now; the row keeps its id, so every canonical state, last-known
    state and outbox row stays with that person. Idempotent: new keys never look positional.
    """
    rows = fetch(
        db,
        "SELECT u.id, u.key, s.name, su.name FROM users u "
        "LEFT JOIN server_users su ON su.user = u.id "
        "LEFT JOIN servers s ON s.id = su.server WHERE u.key GLOB 'map:[0-9]*'",
    )
    old: dict[str, dict[str, str | None]] = {}
    ids: dict[str, int] = {}
    for uid, key, server, name in rows:
        if not is_positional_map_key(str(key)):
            continue
        ids[str(key)] = int(uid)
        accounts = old.setdefault(str(key), {})
        if server is not None:
            accounts[str(server)] = None if name is None else str(name)
    if not old:
        return
    renames, problems = plan_map_key_migration(old, entries)
    for problem in problems:
        logger.info("ledger %s: %s", path, problem)
    taken = {
        str(r[0])
        for r in fetch(
            db,
            f"SELECT key FROM users WHERE key IN ({marks(len(renames))})",  # noqa: S608
            list(renames.values()),
        )
    }
    for key in [k for k, new in renames.items() if new in taken]:
        logger.warning(
            "ledger %s: user %s stays as it is: %s is in the ledger already",
            path,
            key,
            renames.pop(key),
        )
    if not renames:
        return
    write_transaction(
        db,
        lambda conn: conn.executemany(
            "UPDATE users SET key=? WHERE id=?",
            [(new, ids[key]) for key, new in renames.items()],
        ),
    )
    logger.info(
        "ledger %s: users.map keys now follow each entry's names, not its position: %s",
        path,
        ", ".join(f"{key} -> {new}" for key, new in sorted(renames.items())),
    )
