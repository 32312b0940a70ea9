"""Reordering ``users.map`` changes nobody's history, also in a ledger from before stable keys.

Two servers whose people have different account names (alice/alicia, bob/robert), paired by
``users.map``, with a ledger whose map keys are positions (as jfsync wrote them before keys
followed the entries). While jfsync is stopped alice removes a favourite on home and the
operator reorders the map. At the next start her removal must reach alicia on cabin (her
history says the favourite was there and she removed it), not come back as a first-contact
merge of a stranger's history, and nothing of hers may land on bob or robert.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from jfsync.model import UserData
from jfsync.sync.users import map_entry_key
from tests.identity.conftest import RECONCILE_OPTIONS, Stack, emulator
from tests.support.cluster import StartCluster
from tests.support.config import make_config

pytestmark = pytest.mark.timeout(60)

ALICE = {"home": "alice", "cabin": "alicia"}
BOB = {"home": "bob", "cabin": "robert"}


def _as_positional(ledger: Path, entries: list[dict[str, str]]) -> None:
    """Give every map person the key jfsync gave it before: its entry's position."""
    db = sqlite3.connect(ledger)
    with db:
        rows = db.execute(
            "SELECT u.id, su.name FROM users u JOIN server_users su ON su.user = u.id "
            "JOIN servers s ON s.id = su.server WHERE u.key LIKE 'map:%' AND s.name = 'home'"
        ).fetchall()
        assert len(rows) == len(entries)
        for uid, name in rows:
            position = next(i for i, e in enumerate(entries) if e["home"] == name)
            db.execute("UPDATE users SET key = ? WHERE id = ?", (f"map:{position}", uid))
    db.close()


def _keys(ledger: Path) -> set[str]:
    db = sqlite3.connect(ledger)
    try:
        return {str(r[0]) for r in db.execute("SELECT key FROM users WHERE key LIKE 'map:%'")}
    finally:
        db.close()


async def test_reordering_the_map_keeps_each_persons_history(
    tmp_path: Path, start_cluster: StartCluster
) -> None:
    home = emulator("home", users=[("alice", "x"), ("bob", "x")])
    cabin = emulator("cabin", users=[("alicia", "x"), ("robert", "x")])
    emus = {"home": home, "cabin": cabin}
    ledger = tmp_path / "ledger.db"
    stack: Stack = await start_cluster(
        list(emus.values()),
        cls=Stack,
        ledger=ledger,
        users={"match": "map", "map": [ALICE, BOB]},
        reconcile_options=RECONCILE_OPTIONS,
        start=False,
    )
    try:
        await stack.start_service()
        items = [i.id for i in home.leaf_items()]  # same seed and root: the same ids
        mine, his = items[0], items[1]
        stack.change("home", mine, "alice", is_favorite=True)
        stack.change("home", his, "bob", is_favorite=True)
        await stack.wait(
            lambda: (
                stack.holds("cabin", mine, UserData(favorite=True), "alicia")
                and stack.holds("cabin", his, UserData(favorite=True), "robert")
            )
        )
        # jfsync stops (its ledger keeps the map keys of the jfsync before stable keys, by
        # position); alice removes her favourite on home meanwhile.
        await stack.stop_service()
        _as_positional(ledger, [ALICE, BOB])
        stack.change("home", mine, "alice", is_favorite=False)

        # The operator reorders the map (and the servers inside an entry), then starts jfsync.
        reordered = [{"cabin": "robert", "home": "bob"}, ALICE]
        stack.config = make_config(
            emus,
            ledger=ledger,
            timeout_s=5,
            sync={"shutdown_grace": 2},
            users={"match": "map", "map": reordered},
        )
        await stack.start_service()

        await stack.wait(lambda: stack.holds("cabin", mine, UserData(), "alicia"))

        async def quiet() -> bool:
            service = stack.svc()
            for link in service.links.values():
                if link.pusher.in_flight or await service.ledger.outbox_depth(link.name):
                    return False
            return not any(e.pushes_pending for e in emus.values())

        await stack.wait(quiet)
        # Alice's removal holds everywhere; bob's favourite is his alone, on both servers.
        assert stack.data("home", mine, "alice") == UserData()
        assert stack.data("cabin", mine, "alicia") == UserData()
        assert stack.data("home", his, "bob") == UserData(favorite=True)
        assert stack.data("cabin", his, "robert") == UserData(favorite=True)
        assert stack.data("home", mine, "bob") == UserData()
        assert stack.data("cabin", mine, "robert") == UserData()
        assert stack.data("home", his, "alice") == UserData()
        assert stack.data("cabin", his, "alicia") == UserData()
    finally:
        await stack.stop_service()
    assert _keys(ledger) == {map_entry_key(ALICE), map_entry_key(BOB)}
