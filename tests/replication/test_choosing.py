"""Choosing what syncs: library filters, direction per server, and each person's choices.

Emulators over loopback with jfsync between them. Each test is a user changing things on one
server after another; the oracle is what that user should see on every server given the config:
the last change for what is synced, and the server's own state for what is left out.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from jfsync.emulator import Emulator
from jfsync.model import PlayState, UserData
from jfsync.ops.reconcilecmd import run_reconcile
from tests.replication.conftest import MakeCluster
from tests.replication.harness import USER_KEY, WAIT_S, Cluster

pytestmark = pytest.mark.timeout(40)


def _in_library(cluster: Cluster, folder: str) -> list[str]:
    """Free leaf items whose file lies in ``/media/<folder>/`` (movies or tv)."""
    emu = cluster.emus[0]
    found = []
    for item in cluster.free_items:
        found_item = emu.library.get(item)
        assert found_item is not None
        assert found_item.path is not None
        if found_item.path.startswith(f"{emu.library.path_root}/{folder}/"):
            found.append(item)
    return found


def _requests_listing(emu: Emulator, parent: str | None) -> int:
    """``GET /Items`` listings (not reads by id) ``emu`` answered with that ``parentId``
    (None: without one, i.e. of the whole server)."""
    count = 0
    for record in emu.requests:
        if record.route is None or not record.route.endswith("/Items") or record.method != "GET":
            continue
        given = record.query.get("parentId") or record.query.get("ParentId")
        if (given[0] if given else None) == parent and not record.query.get("ids"):
            count += 1
    return count


async def settle_each(cluster: Cluster, round_: int = 1) -> None:
    """A barrier for one-way configs: a sentinel change on every server (a movie, synced by
    every filter here), each applied by the ledger as that server's state, then quiet."""
    sentinels = _in_library(cluster, "movies")[-len(cluster.emus) :]
    expected = {}
    for emu, item in zip(cluster.emus, sentinels, strict=True):
        expected[emu.server_name, await cluster.key(emu.server_name, item)] = cluster.change(
            emu, item, play_count=round_
        )
    ledger = cluster.service.ledger

    async def applied() -> bool:
        for (server, key), state in expected.items():
            if await ledger.last_known(server, USER_KEY, key) != state:
                return False
        return await cluster.is_quiet(sentinels)

    await cluster.service.wait_for(applied, WAIT_S)


async def test_an_excluded_library_is_never_read_nor_written(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(2, server_keys={"b": {"libraries": {"exclude": ["Shows"]}}})
    a, b = cluster.emus
    movie = _in_library(cluster, "movies")[0]
    episode, episode2 = _in_library(cluster, "tv")[:2]
    shows = next(f.id for f in b.library.collection_folders if f.name == "Shows")

    # The user favourites an episode on a: b's Shows library is left out, so b never gets it.
    cluster.change(a, episode, is_favorite=True)
    cluster.change(a, movie, is_favorite=True)
    await cluster.wait_all_hold(movie, UserData(favorite=True))
    # ...and marks another episode played on b: a never hears of it.
    played = cluster.change(b, episode2, played=True)
    await settle_each(cluster, 1)
    assert cluster.data(b, episode) == UserData()
    assert cluster.data(a, episode) == UserData(favorite=True)
    assert cluster.data(a, episode2) == UserData()
    assert cluster.data(b, episode2) == played
    assert not cluster.writes(b, [episode, episode2])
    assert not cluster.writes(a, [episode2])
    # b was listed library by library, never whole and never its Shows library.
    assert _requests_listing(b, shows) == 0
    assert _requests_listing(b, None) == 0
    assert _requests_listing(a, None) > 0  # a has no filter: listed whole
    # Nothing of the user's data of those episodes was read on b (read by id, it is only
    # the library index placing an item an event named: no user, no user data).
    for record in b.requests:
        ids = ",".join(record.query.get("ids", []))
        if episode in ids or episode2 in ids:
            assert not record.query.get("userId"), record


async def test_dry_run_reconcile_shows_the_excluded_libraries(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(2, server_keys={"b": {"libraries": {"include": ["Movies"]}}})
    config = cluster.service.config
    await cluster.service.stop()
    out = io.StringIO()
    await run_reconcile(config, dry_run=True, out=out)
    text = out.getvalue()
    assert "libraries of b: syncing Movies; excluded: Shows" in text
    assert "libraries of a" not in text


async def test_a_receive_only_server_gets_changes_but_sends_none(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(2, server_keys={"b": {"mode": "receive"}})
    a, b = cluster.emus
    item, local = cluster.free_items[:2]
    # The user rates an item on a: b receives it.
    cluster.change(a, item, rating=8.0)
    await cluster.wait_all_hold(item, UserData(rating=8.0))
    # On b (a beta server) they favourite something: it stays on b only.
    cluster.change(b, local, is_favorite=True)
    await settle_each(cluster, 2)
    assert cluster.data(a, local) == UserData()
    assert cluster.data(b, local) == UserData(favorite=True)
    assert not cluster.writes(a, [local])
    # They then change the rating on b: not sent, and a's later change still reaches b.
    cluster.change(b, item, rating=3.0)
    await settle_each(cluster, 3)
    assert cluster.data(a, item) == UserData(rating=8.0)
    cluster.change(a, item, rating=9.0)
    await cluster.wait_all_hold(item, UserData(rating=9.0))


async def test_a_send_only_server_is_never_written(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(2, server_keys={"a": {"mode": "send"}})
    a, b = cluster.emus
    item, other = cluster.free_items[:2]
    # The user marks an item played on a (an archive): b follows.
    played = cluster.change(a, item, played=True)
    await cluster.wait_all_hold(item, played)
    # On b they favourite the same item and another: a is never written.
    cluster.change(b, item, is_favorite=True)
    cluster.change(b, other, is_favorite=True)
    await settle_each(cluster, 4)
    assert not cluster.writes(a)
    assert cluster.data(a, item) == played
    assert cluster.data(a, other) == UserData()
    assert await cluster.service.ledger.outbox_depth("a") == 0


async def test_a_person_syncs_only_the_registers_they_chose(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(
        2,
        users={"choices": {"alice": {"fields": ["play_state"]}, "bob": {"sync": False}}},
        users_connected=1,
    )
    a, b = cluster.emus
    item, item2 = cluster.free_items[:2]
    # Alice rates and plays on a: her play state follows her to b, her rating stays on a.
    cluster.change(a, item, rating=6.0)
    state = cluster.change(a, item, played=True, position_ticks=0)
    await cluster.service.wait_for(lambda: cluster.data(b, item).play_state == state.play_state)
    await settle_each(cluster, 5)
    assert cluster.data(b, item).rating is None
    assert cluster.data(a, item).rating == 6.0
    # Her favourite on b does not travel either.
    cluster.change(b, item2, is_favorite=True)
    await settle_each(cluster, 6)
    assert cluster.data(a, item2) == UserData()
    # Bob opted out: nothing of his is read or written anywhere.
    assert all(
        "bob" not in {s.user_name for s in link.subscribers.values()}
        for link in cluster.service.links.values()
    )
    cluster.change(a, item2, user="bob", played=True)
    await settle_each(cluster, 7)
    assert cluster.data(b, item2, user="bob") == UserData()
    assert cluster.data(b, item, user="bob").play_state == PlayState()
