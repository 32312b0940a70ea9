"""jfsync with two versions of a film on one server (fact sheet Corrections 10).

Server ``a`` (Jellyfin 10.10.7) holds a film twice (the same provider ids, two files), so both
versions share one user-data record there: a change to one version changes the other, and only
the version acted on is pushed. Server ``b`` holds the film once. Whatever version the user acts
on, every server must end up showing the user's last action, and jfsync must not write in a
loop.
"""

from __future__ import annotations

import pytest

from jfsync.emulator import Emulator
from jfsync.emulator.library import LibraryItem
from tests.replication.harness import Cluster, new_emulator
from tests.support.cluster import StartCluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def cluster(start_cluster: StartCluster) -> tuple[Cluster, LibraryItem, LibraryItem]:
    """Servers a (the film twice) and b (once), with jfsync running between them."""
    a, b = new_emulator("a"), new_emulator("b")
    film = next(i for i in a.leaf_items() if i.type == "Movie")
    folder = film.path.rsplit("/", 1)[0]
    extra = a.add_item(
        "Movie",
        film.name,
        year=film.year,
        provider_ids=dict(film.provider_ids),
        path=f"{folder}/{film.name} - 4K.mkv",
    )
    # b first: the harness's sentinel items come from the first server and must exist on both.
    emus: list[Emulator] = [b, a]
    made: Cluster = await start_cluster(emus, cls=Cluster)
    return made, film, extra


async def test_a_change_to_either_version_reaches_every_server_without_a_loop(
    cluster: tuple[Cluster, LibraryItem, LibraryItem],
) -> None:
    c, film, extra = cluster
    a, b = c.emu("a"), c.emu("b")
    watched = [film.id, extra.id]

    # The user marks the film a favourite on a, through the first version.
    c.change(a, film.id, is_favorite=True)
    await c.settle()
    # a shares one record between its versions; b got the user's action.
    assert c.data(a, extra.id).favorite is True
    assert c.data(b, film.id).favorite is True
    writes_after_first = len(c.writes(a, watched)) + len(c.writes(b, watched))

    # The user takes it back on b.
    c.change(b, film.id, is_favorite=False)
    await c.settle()
    assert c.data(a, film.id).favorite is False
    assert c.data(a, extra.id).favorite is False
    assert c.data(b, film.id).favorite is False

    # The user rates it on a, through the second version (the first changes silently).
    c.change(a, extra.id, rating=9.0)
    await c.settle()
    assert c.data(a, film.id).rating == 9.0
    assert c.data(b, film.id).rating == 9.0, (
        "the user rated the film on a (4K version); b does not show it"
    )

    # Quiet now: no further writes anywhere (no ping-pong between the versions).
    before = len(c.writes(a, watched)) + len(c.writes(b, watched))
    await c.settle()
    await c.settle()
    assert len(c.writes(a, watched)) + len(c.writes(b, watched)) == before
    assert before >= writes_after_first


async def test_the_change_through_the_second_version_arrives_with_the_next_reconcile(
    cluster: tuple[Cluster, LibraryItem, LibraryItem],
) -> None:
    c, film, extra = cluster
    a, b = c.emu("a"), c.emu("b")
    # The user rates the film on a through its 4K version: a pushes only that version.
    c.change(a, extra.id, rating=9.0)
    await c.settle()
    assert c.data(a, film.id).rating == 9.0  # shared record on a
    # Not lost: the next full reconcile reads a's first version and copies it to b.
    assert c.service.reconciler is not None
    await c.service.reconciler.reconcile()
    await c.settle()
    assert c.data(b, film.id).rating == 9.0
    assert c.data(a, extra.id).rating == 9.0
    # And nothing loops afterwards.
    watched = [film.id, extra.id]
    before = len(c.writes(a, watched)) + len(c.writes(b, watched))
    await c.settle()
    assert len(c.writes(a, watched)) + len(c.writes(b, watched)) == before
