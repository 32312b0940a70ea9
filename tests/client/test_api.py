"""The REST client against the emulator over loopback: every call, errors, and the write path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from jfsync.emulator import Emulator
from jfsync.errors import (
    AuthRejectedError,
    BadRequestError,
    BadResponseError,
    NotFoundError,
    RateLimitedError,
    RequestTimeoutError,
    ServerSideError,
    UnreachableError,
    UnsupportedServerError,
    is_retryable,
)
from jfsync.jellyfin.api import JellyfinClient, auth_header, parse_version
from jfsync.model import ALL_REGISTERS, PlayState, Register, UserData
from jfsync.timing import ManualClock
from tests.client.conftest import API_KEY, MakeClient, MakeEmulator

T0 = int(datetime(2025, 3, 1, 20, 15, 42, tzinfo=UTC).timestamp())


def _leaf(emu: Emulator, kind: str = "Movie") -> str:
    return next(i.id for i in emu.leaf_items() if i.type == kind)


# --------------------------------------------------------------------------- server and users


async def test_public_info_and_supported_versions(emu: Emulator, client: JellyfinClient) -> None:
    info = await client.ensure_supported()
    assert info.version == emu.version
    assert info.id == emu.server_id
    assert await client.server_version() == parse_version(emu.version)
    system = await client.system_info()
    assert system.id == emu.server_id


@pytest.mark.parametrize("other", ["10.9.11", "12.0.0"])
async def test_other_supported_versions(
    make_emulator: MakeEmulator, make_client: MakeClient, other: str
) -> None:
    client = make_client(await make_emulator(server_version=other))
    info = await client.ensure_supported()
    assert info.version == other


async def test_10_8_is_refused_with_a_clear_message(
    make_emulator: MakeEmulator, make_client: MakeClient
) -> None:
    client = make_client(await make_emulator(server_version="10.8.13"))
    with pytest.raises(UnsupportedServerError) as caught:
        await client.ensure_supported()
    assert str(caught.value) == (
        "[emu] Jellyfin 10.8.13 has no user-data write route; jfsync needs 10.9 or newer. "
        "Upgrade the server."
    )
    with pytest.raises(UnsupportedServerError):
        await client.mint_user_token("0" * 31 + "1", "jfsync-test-device")


async def test_bad_key_is_auth_rejected_and_not_retryable(
    emu: Emulator, make_client: MakeClient
) -> None:
    client = make_client(emu, api_key="ffffffffffffffffffffffffffffffff")
    await client.public_info()  # anonymous: still works
    with pytest.raises(AuthRejectedError) as caught:
        await client.system_info()
    assert caught.value.status == 401
    assert caught.value.route == "/System/Info"
    assert not is_retryable(caught.value)
    assert "ffffffff" not in str(caught.value)


async def test_users_and_user(emu: Emulator, client: JellyfinClient) -> None:
    users = await client.users()
    by_name = {u.name: u for u in users}
    assert set(by_name) == {"alice", "bob", "Carol"}
    assert by_name["alice"].is_admin
    assert not by_name["bob"].is_admin
    assert by_name["bob"].id == emu.user_id("bob")
    one = await client.user(emu.user_id("Carol"))
    assert one.name == "Carol"
    with pytest.raises(NotFoundError):
        await client.user("f" * 32)


async def test_current_user_tells_api_key_from_user_token(
    emu: Emulator, client: JellyfinClient
) -> None:
    me = await client.current_user(emu.user_token("bob"))
    assert me.id == emu.user_id("bob")
    with pytest.raises(BadRequestError):
        await client.current_user()  # an API key is not owned by a user


def test_auth_header_carries_every_field_and_encodes_values() -> None:
    header = auth_header('dev "1", x', "tok")
    assert header.startswith('MediaBrowser Client="jfsync", Device="jfsync", ')
    assert 'DeviceId="dev %221%22%2C x"' in header
    assert header.endswith('Token="tok"')
    assert "Token" not in auth_header("dev")


def test_client_repr_hides_key_and_url_credentials(make_client: MakeClient, emu: Emulator) -> None:
    client = make_client(emu)
    assert API_KEY not in repr(client)
    assert "emu" in repr(client)


# --------------------------------------------------------------------------- items


async def test_iter_items_pages_through_everything_for_a_user(
    emu: Emulator, client: JellyfinClient
) -> None:
    alice = emu.user_id("alice")
    items = [i async for i in client.iter_items(alice, page_size=7)]
    leaves = {i.id: i for i in emu.leaf_items()}
    assert len(items) == len(leaves)
    assert {i.id for i in items} == set(leaves)
    for item in items:
        expected = leaves[item.id]
        assert item.type == expected.type
        assert item.path == expected.path
        assert item.provider_ids == expected.provider_ids
        assert item.user_data is not None
        if item.type == "Episode":
            assert item.series_id == expected.series_id
            assert item.index_number == expected.index_number
            assert item.parent_index_number == expected.parent_index_number


async def test_iter_items_without_user_has_no_user_data_and_honours_fields(
    emu: Emulator, client: JellyfinClient
) -> None:
    items = [i async for i in client.iter_items(None, include_types=("Movie",), fields=())]
    assert items
    assert all(i.type == "Movie" and i.user_data is None for i in items)
    assert all(i.path is None and i.provider_ids == {} for i in items)


async def test_iter_items_filters_ids_and_parent(emu: Emulator, client: JellyfinClient) -> None:
    bob = emu.user_id("bob")
    movie, episode = _leaf(emu, "Movie"), _leaf(emu, "Episode")
    emu.save_user_data(bob, movie, is_favorite=True)
    emu.save_user_data(bob, episode, played=True, play_count=1)
    favs = [i.id async for i in client.iter_items(bob, filters=("IsFavorite",))]
    assert favs == [movie]
    played = [i.id async for i in client.iter_items(bob, filters=("IsPlayed",))]
    assert played == [episode]
    picked = [i.id async for i in client.iter_items(bob, ids=[movie, episode.upper()])]
    assert sorted(picked) == sorted([movie, episode])
    season = emu.item(episode).season_id
    assert season is not None
    in_season = {i.id async for i in client.iter_items(bob, parent_id=season)}
    assert episode in in_season
    assert in_season == {i.id for i in emu.leaf_items() if i.season_id == season}


async def test_iter_items_survives_items_removed_and_added_mid_scan(
    make_emulator: MakeEmulator, make_client: MakeClient
) -> None:
    emu = await make_emulator(library_size=120)
    client = make_client(emu)
    alice = emu.user_id("alice")
    before = {i.id for i in emu.leaf_items()}
    seen: list[str] = []
    added: list[str] = []
    async for item in client.iter_items(alice, page_size=20):
        seen.append(item.id)
        if len(seen) == 25:
            # Remove items already listed (every later item shifts left by up to 3 places)
            # and add some that sort first (the listing shifts right again).
            for gone in seen[:3]:
                emu.remove_item(gone)
            for n in range(2):
                added.append(emu.add_item("Movie", f"AAA Early {n}", year=2001).id)
    assert len(seen) == len(set(seen)), "an item was listed twice"
    assert before <= set(seen), "items present for the whole scan were skipped"
    assert set(seen) <= before | set(added)


async def test_iter_items_chunks_long_id_lists(emu: Emulator, client: JellyfinClient) -> None:
    ids = [i.id for i in emu.leaf_items()]
    wanted = ids * 3  # duplicates and more than one request's worth of ids
    got = [i.id async for i in client.iter_items(None, ids=wanted, page_size=5)]
    assert sorted(got) == sorted(ids)


async def test_user_data_of_reads_a_users_data_of_many_items_at_once(
    emu: Emulator, client: JellyfinClient
) -> None:
    """bob favourited a film and rated an episode; reading both, an item bob cannot see and
    more ids than one request carries gives bob's data of every item there is, by id."""
    bob = emu.user_id("bob")
    movie, episode = _leaf(emu), _leaf(emu, "Episode")
    emu.save_user_data(bob, movie, is_favorite=True)
    emu.save_user_data(bob, episode, rating=6.5)
    ids = [i.id for i in emu.leaf_items()]
    unknown = "f" * 32
    wanted = [movie.upper(), *ids, unknown] * 4  # duplicates; over 150 ids in all
    assert len(wanted) > 150
    found = await client.user_data_of(bob, wanted)
    assert set(found) == set(ids)
    assert found[movie] == UserData(favorite=True)
    assert found[episode] == UserData(rating=6.5)
    assert all(found[i] == UserData() for i in ids if i not in (movie, episode))
    assert await client.user_data_of(bob, []) == {}


async def test_a_batch_of_500_is_read_in_three_requests_with_nothing_but_ids_asked(
    make_emulator: MakeEmulator, make_client: MakeClient
) -> None:
    """bob marked a film played half-way through and favourited another; the pusher's read of
    500 items gives bob's data of both exactly, in three requests of at most 170 ids that ask
    the server for no sort, no fields and no images."""
    emu = await make_emulator(library_size=520)
    client = make_client(emu)
    bob = emu.user_id("bob")
    ids = [i.id for i in emu.leaf_items()][:500]
    assert len(ids) == 500
    when = datetime(2025, 3, 1, 20, 15, 42, 999_000, tzinfo=UTC)
    emu.save_user_data(bob, ids[7], played=True, play_count=2, last_played=when, position_ticks=99)
    emu.save_user_data(bob, ids[400], is_favorite=True, rating=7.5)
    before = len(emu.requests)
    found = await client.user_data_of(bob, ids)
    reads = [r for r in emu.requests[before:] if r.path == "/Items"]
    assert len(reads) == 3
    for read in reads:
        assert len(read.query["ids"][0].split(",")) <= 170
        assert not {"sortBy", "fields"} & set(read.query)
        assert read.query["enableImages"] == ["false"]
    assert set(found) == set(ids)
    assert found[ids[7]] == UserData(play_state=PlayState(True, 2, T0, 99))
    assert found[ids[400]] == UserData(favorite=True, rating=7.5)
    assert found[ids[0]] == UserData()


@pytest.mark.parametrize("prefix", ["jellyfin", "media server"])
async def test_writes_reach_a_server_behind_a_path_prefix(
    make_emulator: MakeEmulator, make_client: MakeClient, http: aiohttp.ClientSession, prefix: str
) -> None:
    """alice's server sits behind a reverse proxy at /jellyfin/ (here: the emulator with a
    prefix-stripping proxy in front), or at a prefix the URL must encode; jfsync's write of a
    played state lands on it."""
    emu = await make_emulator()
    alice = emu.user_id("alice")
    movie = _leaf(emu)

    async def forward(request: web.Request) -> web.Response:
        if not request.path.startswith(f"/{prefix}/"):
            raise web.HTTPNotFound
        tail = request.path.removeprefix(f"/{prefix}/")
        async with http.request(
            request.method,
            f"{emu.url}/{tail}",
            params=request.query,
            data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        ) as answer:
            return web.Response(
                body=await answer.read(), status=answer.status, content_type="application/json"
            )

    async with served(forward) as port:
        client = JellyfinClient(
            "proxied",
            f"http://127.0.0.1:{port}/{quote(prefix)}/",
            API_KEY,
            session=http,
            device_id="d",
        )
        played = UserData(play_state=PlayState(True, 1, T0, 0))
        await client.write_user_data(
            alice, movie, played, UserData(), frozenset({Register.PLAY_STATE})
        )
        assert emu.user_data(alice, movie).play_state == played.play_state
        assert (await client.user_data_of(alice, [movie]))[movie] == played


# --------------------------------------------------------------------------- user data


async def test_get_and_update_user_data(emu: Emulator, client: JellyfinClient) -> None:
    alice, movie = emu.user_id("alice"), _leaf(emu)
    assert (await client.get_user_data(alice, movie)).to_user_data().is_default
    answer = await client.update_user_data(alice, movie, {"IsFavorite": True, "Rating": 7.5})
    assert answer.is_favorite
    assert answer.rating == 7.5
    assert emu.user_data(alice, movie) == UserData(favorite=True, rating=7.5)
    again = await client.get_user_data(alice, movie)
    assert again.to_user_data() == UserData(favorite=True, rating=7.5)
    [write] = emu.writes
    assert write.method == "POST"
    assert write.body == {"IsFavorite": True, "Rating": 7.5}


async def test_clear_rating_and_mark_unplayed(emu: Emulator, client: JellyfinClient) -> None:
    bob, episode = emu.user_id("bob"), _leaf(emu, "Episode")
    emu.save_user_data(
        bob,
        episode,
        rating=4.0,
        played=True,
        play_count=3,
        last_played=datetime.fromtimestamp(T0, UTC),
        position_ticks=1234,
    )
    cleared = await client.clear_rating(bob, episode)
    assert cleared.rating is None
    assert emu.user_data(bob, episode).rating is None
    unplayed = await client.mark_unplayed(bob, episode)
    assert unplayed.to_user_data().play_state == PlayState()
    assert emu.user_data(bob, episode) == UserData()
    assert [(w.method, w.route) for w in emu.writes] == [
        ("DELETE", "/UserItems/{itemId}/Rating"),
        ("DELETE", "/UserPlayedItems/{itemId}"),
    ]


async def test_unknown_item_is_not_found(emu: Emulator, client: JellyfinClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_user_data(emu.user_id("alice"), "a" * 32)
    assert not is_retryable(caught.value)


# --------------------------------------------------------------------------- apply_user_data

PLAYED = PlayState(played=True, play_count=2, last_played_s=T0, position_ticks=0)
RESUME = PlayState(played=False, play_count=1, last_played_s=T0 + 60, position_ticks=5_000_000)
CASES: list[tuple[str, UserData, UserData, frozenset[Register]]] = [
    ("favourite on", UserData(), UserData(favorite=True), frozenset({Register.FAVORITE})),
    ("favourite off", UserData(favorite=True), UserData(), frozenset({Register.FAVORITE})),
    ("rating set", UserData(), UserData(rating=8.0), frozenset({Register.RATING})),
    ("rating changed", UserData(rating=2.0), UserData(rating=9.5), frozenset({Register.RATING})),
    ("rating cleared", UserData(rating=6.0), UserData(), frozenset({Register.RATING})),
    ("played", UserData(), UserData(play_state=PLAYED), frozenset({Register.PLAY_STATE})),
    ("resume", UserData(), UserData(play_state=RESUME), frozenset({Register.PLAY_STATE})),
    (
        "unplayed (date cleared)",
        UserData(play_state=PLAYED),
        UserData(),
        frozenset({Register.PLAY_STATE}),
    ),
    (
        "count kept, date cleared",
        UserData(play_state=PLAYED),
        UserData(play_state=PlayState(play_count=4, position_ticks=77)),
        frozenset({Register.PLAY_STATE}),
    ),
    (
        "everything at once",
        UserData(favorite=True, rating=3.0, play_state=RESUME),
        UserData(favorite=False, rating=None, play_state=PLAYED),
        frozenset(ALL_REGISTERS),
    ),
]


@pytest.mark.parametrize("decoded", [True, False], ids=["apply", "write"])
@pytest.mark.parametrize(
    ("case", "start", "desired", "registers"), CASES, ids=[c[0] for c in CASES]
)
async def test_apply_user_data_end_states(
    emu: Emulator,
    client: JellyfinClient,
    case: str,
    start: UserData,
    desired: UserData,
    registers: frozenset[Register],
    decoded: bool,
) -> None:
    """The pusher's write (answers not decoded) makes exactly the same requests."""
    alice, movie = emu.user_id("alice"), _leaf(emu)
    _seed(emu, alice, movie, start)
    assert emu.user_data(alice, movie) == start
    if decoded:
        result = await client.apply_user_data(alice, movie, desired, start, registers)
        assert result == desired, case
    else:
        await client.write_user_data(alice, movie, desired, start, registers)
    assert emu.user_data(alice, movie) == desired, case
    methods = [(w.method, w.route) for w in emu.writes]
    assert ("POST", "/UserPlayedItems/{itemId}") not in methods
    # Exactly the writes the change needs: one DELETE per cleared value, at most one POST.
    deletes = int(
        start.rating is not None and desired.rating is None and Register.RATING in registers
    )
    deletes += int(
        start.play_state.last_played_s is not None
        and desired.play_state.last_played_s is None
        and Register.PLAY_STATE in registers
    )
    assert sum(1 for m, _ in methods if m == "DELETE") == deletes
    assert sum(1 for m, _ in methods if m == "POST") <= 1


async def test_apply_user_data_posts_only_the_changed_registers(
    emu: Emulator, client: JellyfinClient
) -> None:
    bob, movie = emu.user_id("bob"), _leaf(emu)
    start = UserData(favorite=True, rating=5.0, play_state=PLAYED)
    _seed(emu, bob, movie, start)
    desired = UserData(favorite=True, rating=7.0, play_state=PLAYED)
    result = await client.apply_user_data(bob, movie, desired, start, frozenset(ALL_REGISTERS))
    assert result == desired
    [write] = emu.writes
    assert write.body == {"Rating": 7.0}


async def test_apply_user_data_skips_when_target_already_holds_it(
    emu: Emulator, client: JellyfinClient
) -> None:
    bob, movie = emu.user_id("bob"), _leaf(emu)
    state = UserData(favorite=True, rating=5.0, play_state=PLAYED)
    _seed(emu, bob, movie, state)
    # Other registers differ, but only the equal ones are asked for: nothing is sent.
    other = UserData(favorite=False, rating=None, play_state=PLAYED)
    result = await client.apply_user_data(
        bob, movie, other, state, frozenset({Register.PLAY_STATE})
    )
    assert result == state
    result = await client.apply_user_data(bob, movie, state, state, frozenset(ALL_REGISTERS))
    assert result == state
    assert emu.writes == []


async def test_apply_user_data_ignores_registers_not_asked_for(
    emu: Emulator, client: JellyfinClient
) -> None:
    alice, movie = emu.user_id("alice"), _leaf(emu)
    start = UserData(favorite=True, rating=3.0)
    _seed(emu, alice, movie, start)
    desired = UserData(favorite=False, rating=None, play_state=PLAYED)
    result = await client.apply_user_data(
        alice, movie, desired, start, frozenset({Register.PLAY_STATE})
    )
    assert result == UserData(favorite=True, rating=3.0, play_state=PLAYED)
    [write] = emu.writes
    assert write.body is not None
    assert set(write.body) == {"Played", "PlayCount", "PlaybackPositionTicks", "LastPlayedDate"}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (500, ServerSideError, True),
        (503, ServerSideError, True),
        (429, RateLimitedError, True),
        (401, AuthRejectedError, False),
        (403, AuthRejectedError, False),
        (404, NotFoundError, False),
        (400, BadRequestError, False),
    ],
)
async def test_error_status_maps_to_exception(
    make_emulator: MakeEmulator,
    make_client: MakeClient,
    status: int,
    kind: type[Exception],
    retryable: bool,
) -> None:
    emu = await make_emulator()
    client = make_client(emu)
    alice, movie = emu.user_id("alice"), _leaf(emu)
    emu.fail_next_writes(1, status)
    with pytest.raises(kind) as caught:
        await client.update_user_data(alice, movie, {"IsFavorite": True})
    err = caught.value
    assert is_retryable(err) is retryable
    assert getattr(err, "status", None) == status
    assert "/UserItems/{itemId}/UserData" in str(err)
    assert API_KEY not in str(err)
    assert API_KEY not in repr(err)
    # The failure was used up: the same write now goes through.
    answer = await client.update_user_data(alice, movie, {"IsFavorite": True})
    assert answer.is_favorite


async def test_slow_server_times_out(make_emulator: MakeEmulator, make_client: MakeClient) -> None:
    clock = ManualClock()
    emu = await make_emulator(clock=clock)
    client = make_client(emu, timeout_s=0.05)
    emu.set_latency(30.0)  # waits on the manual clock, which never moves: no answer
    with pytest.raises(RequestTimeoutError) as caught:
        await client.public_info()
    assert is_retryable(caught.value)
    assert "/System/Info/Public" in str(caught.value)
    emu.set_latency(0.0)
    await clock.advance(30.0)  # release the parked handler before closing


async def test_stopped_listener_is_unreachable_then_recovers(
    emu: Emulator, client: JellyfinClient
) -> None:
    await client.public_info()
    await emu.stop_listener()
    with pytest.raises(UnreachableError) as caught:
        await client.users()
    assert is_retryable(caught.value)
    assert "GET /Users" in str(caught.value)
    await emu.start_listener()
    assert len(await client.users()) == 3


def _seed(emu: Emulator, user_id: str, item_id: str, state: UserData) -> None:
    ps = state.play_state
    emu.save_user_data(
        user_id,
        item_id,
        is_favorite=state.favorite,
        rating=state.rating,
        played=ps.played,
        play_count=ps.play_count,
        last_played=None
        if ps.last_played_s is None
        else datetime.fromtimestamp(ps.last_played_s, UTC),
        position_ticks=ps.position_ticks,
    )
    emu.writes.clear()


async def test_dates_compare_at_one_second(emu: Emulator, client: JellyfinClient) -> None:
    alice, movie = emu.user_id("alice"), _leaf(emu)
    emu.save_user_data(
        alice,
        movie,
        played=True,
        play_count=2,
        last_played=datetime.fromtimestamp(T0, UTC).replace(microsecond=730_000),
    )
    emu.writes.clear()
    current = (await client.get_user_data(alice, movie)).to_user_data()
    desired = UserData(play_state=PLAYED)  # last played at T0 exactly
    result = await client.apply_user_data(alice, movie, desired, current, frozenset(ALL_REGISTERS))
    assert result == desired
    assert emu.writes == []


@pytest.mark.parametrize("other", ["10.9.11", "12.0.0"])
async def test_write_path_and_tokens_on_10_9_and_12(
    make_emulator: MakeEmulator, make_client: MakeClient, other: str
) -> None:
    # 10.9 omits ItemId in REST user data and 12 ignores legacy auth: neither may matter.
    emu = await make_emulator(server_version=other)
    client = make_client(emu)
    await client.ensure_supported()
    bob, episode = emu.user_id("bob"), _leaf(emu, "Episode")
    desired = UserData(favorite=True, rating=6.5, play_state=RESUME)
    result = await client.apply_user_data(
        bob, episode, desired, UserData(), frozenset(ALL_REGISTERS)
    )
    assert result == desired
    assert (await client.get_user_data(bob, episode)).to_user_data() == desired
    back = await client.apply_user_data(bob, episode, UserData(), desired, frozenset(ALL_REGISTERS))
    assert back == UserData()
    assert emu.user_data(bob, episode) == UserData()
    token = await client.mint_user_token(bob, f"jfsync-{emu.server_id}-{bob}")
    assert (await client.current_user(token)).id == bob
    items = [i async for i in client.iter_items(bob, page_size=9)]
    assert len(items) == len(emu.leaf_items())


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_write_answered_by_a_redirect_is_not_taken_as_made(status: int) -> None:
    """A server (or its proxy) answers the write with a redirect: aiohttp would send a POST on
    as a GET (301-303), which answers the item's data, and the write would count as made. The
    write fails instead, saying where the server points and what to change; nothing is sent
    to the redirect's target (here on the same server, where a GET would succeed)."""
    followed: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        if request.path.startswith("/moved"):
            followed.append(request.method)
            return web.json_response({"Played": False, "PlayCount": 0})
        return _redirect(status, f"http://{request.host}/moved{request.path_qs}")

    async with served(moved) as port, aiohttp.ClientSession() as http:
        client = JellyfinClient(
            "moved", f"http://127.0.0.1:{port}", API_KEY, session=http, device_id="d"
        )
        played = UserData(play_state=PlayState(True, 1, T0, 0))
        with pytest.raises(BadResponseError) as caught:
            await client.write_user_data(
                "a" * 32, "b" * 32, played, UserData(), frozenset({Register.PLAY_STATE})
            )
        await client.close()
    message = str(caught.value)
    assert f"POST with {status}, a redirect to http://127.0.0.1:{port};" in message
    assert "set this server's url" in message
    assert "/moved" not in message
    assert API_KEY not in message
    assert followed == []


def _redirect(status: int, location: str) -> web.Response:
    """A bare redirect answer of ``status`` to ``location``."""
    return web.Response(status=status, headers={"Location": location})


@asynccontextmanager
async def served(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[int]:
    """Serve every route with ``handler`` on 127.0.0.1; yield the port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
