"""Every JSON body the emulator returns validates against the official OpenAPI of its version.

For 10.10.7 and 10.11.11 the test drives every implemented documented route that answers JSON,
with several shapes of data (movies, episodes, folders, ratings, dates, positions), validates
each 200 body against that route's response schema (``$ref``s resolved, Guid and date formats
checked strictly as Jellyfin writes them), and then proves that no documented JSON route of the
emulator was left out. Websocket messages validate against the message schemas.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.timing import ManualClock
from tests.emulator.conftest import (
    Http,
    MakeEmulator,
    SpecValidator,
    next_message,
    spec_validator,
)

pytestmark = pytest.mark.timeout(60)

VERSIONS = ["10.10.7", "10.11.11"]


class CheckedHttp(Http):
    """An HTTP helper that validates every 200 JSON answer of a documented route."""

    def __init__(self, session: aiohttp.ClientSession, emu: Emulator, spec: SpecValidator) -> None:
        super().__init__(session, emu)
        self.spec = spec
        self.checked: set[tuple[str, str]] = set()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send, then validate the body against the route the emulator says it matched."""
        reply = await super().call(method, path, **kwargs)
        record = self.emu.requests[-1]
        assert reply.status in (200, 204), (method, path, reply.status, reply.body)
        if reply.status == 200:
            assert record.route is not None, f"{method} {path} did not match a documented route"
            self.spec.validate_response(record.route, method, reply.body)
            self.checked.add((method, record.route))
        return reply


@pytest.mark.parametrize("version", VERSIONS)
async def test_every_documented_json_route_validates(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    clock: ManualClock,
    version: str,
) -> None:
    spec = spec_validator(version)
    emu = await make_emulator(server_version=version, clock=clock)
    http = CheckedHttp(session, emu, spec)
    alice, bob = emu.user_id("alice"), emu.user_id("bob")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    episode = next(i for i in emu.leaf_items() if i.type == "Episode")
    season = emu.item(episode.season_id or "")
    series = emu.item(episode.series_id or "")
    folder = emu.library.movies_folder
    emu.save_user_data(
        alice,
        movie.id,
        played=True,
        play_count=2,
        rating=7.5,
        is_favorite=True,
        position_ticks=(movie.run_time_ticks or 0) // 3,
        last_played=datetime(2025, 3, 1, 20, 15, 42, 123456, tzinfo=UTC),
    )
    emu.save_user_data(alice, episode.id, played=True, last_played=emu.now())

    await http.get("/System/Info/Public", headers={})
    await http.get("/System/Ping", headers={})
    await http.post("/System/Ping", headers={})
    await http.get("/System/Info")
    await http.get("/Users")
    await http.get("/Users/Public", headers={})
    await http.get(f"/Users/{alice}")
    login = await http.post(
        "/Users/AuthenticateByName", token=None, json_body={"Username": "bob", "Pw": "bob-pw"}
    )
    bob_token = login.body["AccessToken"]
    await http.get("/Users/Me", token=bob_token)
    await http.get("/QuickConnect/Enabled", headers={})
    started = await http.post("/QuickConnect/Initiate", token=None, device_id="qc")
    await http.get("/QuickConnect/Connect", params={"secret": started.body["Secret"]}, token=None)
    await http.post("/QuickConnect/Authorize", params={"code": started.body["Code"], "userId": bob})
    await http.post(
        "/Users/AuthenticateWithQuickConnect",
        token=None,
        json_body={"Secret": started.body["Secret"]},
    )
    await http.post("/Auth/Keys", params={"app": "another"})
    await http.get("/Auth/Keys")
    await http.get("/Sessions")

    listing = {"Recursive": "true", "Fields": "Path,ProviderIds,DateCreated,SortName,ParentId"}
    for params in (
        {"userId": alice, **listing},
        {"userId": alice},
        {**listing, "Limit": "5"},
        {"userId": alice, "ParentId": series.id, "Fields": "ChildCount"},
        {"userId": alice, "ParentId": series.id, "Fields": "RecursiveItemCount,ChildCount"},
        {
            "userId": alice,
            "IncludeItemTypes": "Series",
            "Recursive": "true",
            "Fields": "RecursiveItemCount",
        },
        {"userId": alice, "Filters": "IsPlayed", "Recursive": "true", "SortBy": "DatePlayed"},
        {
            "userId": alice,
            "IncludeItemTypes": "Movie",
            "Recursive": "true",
            "EnableImages": "false",
        },
    ):
        await http.get("/Items", params=params)
    await http.get("/Items", token=bob_token, params={"Recursive": "true", "Limit": "3"})
    for item in (movie, episode, season, series, folder):
        await http.get(f"/Items/{item.id}", params={"userId": alice})
        await http.get(f"/Items/{item.id}")
        await http.get(f"/UserItems/{item.id}/UserData", params={"userId": alice})
    await http.get("/UserViews", params={"userId": alice})
    shows = {"userId": alice, "Fields": "RecursiveItemCount,Path"}
    await http.get(f"/Shows/{series.id}/Episodes", params=shows)
    await http.get(f"/Shows/{series.id}/Episodes", params={"seasonId": season.id, "Limit": "2"})
    await http.get(f"/Shows/{series.id}/Seasons", params=shows)
    await http.get("/Shows/NextUp", params={"userId": alice})
    await http.get("/Shows/NextUp", params={"userId": bob, "seriesId": series.id})
    await http.get("/UserItems/Resume", params={"userId": alice, "Limit": "3"})
    await http.get("/Items/Latest", params={"userId": alice, "Fields": "RecursiveItemCount"})
    await http.get("/Items/Latest", params={"userId": alice, "groupItems": "false"})
    await http.get("/Items/Suggestions", params={"userId": alice, "Limit": "4"})
    await http.get("/Items/Root", params={"userId": alice})
    await http.get("/Items/Counts", params={"userId": alice})
    await http.get("/Items/Filters", params={"userId": alice})
    await http.get("/Library/MediaFolders")
    await http.get("/Library/VirtualFolders")
    await http.get(f"/Items/{episode.id}/Ancestors", params={"userId": alice})
    await http.get(f"/Items/{episode.id}/Ancestors")
    await http.get(f"/Items/{movie.id}/Similar", params={"userId": alice, "Limit": "3"})
    await http.get("/Artists", params={"userId": alice})
    await http.get(f"/Items/{emu.library.movies_root.id}", params={"userId": alice})

    await http.post(
        f"/UserItems/{movie.id}/UserData",
        params={"userId": bob},
        json_body={
            "Played": True,
            "PlayCount": 1,
            "IsFavorite": True,
            "Rating": 10,
            "PlaybackPositionTicks": 5,
            "LastPlayedDate": "2025-03-01T20:15:42.0000000Z",
        },
    )
    await http.post(f"/UserFavoriteItems/{movie.id}", params={"userId": bob})
    await http.delete(f"/UserFavoriteItems/{movie.id}", params={"userId": bob})
    await http.post(f"/UserItems/{movie.id}/Rating", params={"userId": bob, "likes": "false"})
    await http.delete(f"/UserItems/{movie.id}/Rating", params={"userId": bob})
    await http.post(
        f"/UserPlayedItems/{movie.id}", params={"userId": bob, "datePlayed": "20240101000000"}
    )
    await http.delete(f"/UserPlayedItems/{movie.id}", params={"userId": bob})
    await http.post(f"/UserPlayedItems/{season.id}", params={"userId": bob})
    await http.delete(f"/UserPlayedItems/{series.id}", params={"userId": bob})
    await http.post("/Sessions/Playing", token=bob_token, json_body={"ItemId": episode.id})
    await http.post(
        "/Sessions/Playing/Progress",
        token=bob_token,
        json_body={"ItemId": episode.id, "PositionTicks": 10},
    )
    await http.post(
        "/Sessions/Capabilities",
        token=bob_token,
        params={"playableMediaTypes": "Video", "supportedCommands": "Play,Nope"},
    )
    await http.post(
        "/Sessions/Capabilities/Full",
        token=bob_token,
        json_body={"PlayableMediaTypes": ["Video"], "SupportsMediaControl": True},
    )
    await http.post(f"/PlayingItems/{movie.id}", token=bob_token)
    await http.post(
        f"/PlayingItems/{movie.id}/Progress", token=bob_token, params={"positionTicks": "99"}
    )
    # A session that plays something: NowPlayingItem, PlayState and LastPlaybackCheckIn.
    await http.get("/Sessions")
    await http.get("/Sessions", params={"activeWithinSeconds": "60", "deviceId": "pytest-device"})
    await http.get("/Sessions", params={"controllableByUserId": bob})
    await http.delete(f"/PlayingItems/{movie.id}", token=bob_token, params={"positionTicks": "99"})
    await http.post(
        "/Sessions/Playing/Stopped",
        token=bob_token,
        json_body={"ItemId": episode.id, "PositionTicks": 10},
    )
    await http.post("/Sessions/Playing/Ping", token=bob_token)
    await http.post("/Sessions/Logout", token=bob_token)

    # Every documented route the emulator implements that answers JSON was validated above.
    from jfsync.emulator.app import JellyfinApi

    documented_json = {
        (route.method, route.template)
        for route in JellyfinApi(emu).routes
        if route.documented and spec.response_pointer(route.template, route.method) is not None
    }
    assert documented_json - http.checked == set()


def test_the_validator_rejects_what_jellyfin_would_not_write() -> None:
    spec = spec_validator("10.10.7")
    good = {"PlaybackPositionTicks": 0, "PlayCount": 0, "IsFavorite": False, "Played": False}
    spec.validate_schema("UserItemDataDto", good)
    bad_values = [
        {**good, "Unknown": 1},
        {**good, "ItemId": "9f86d081-884c-7d65-9a2f-eaa0c55ad015"},
        {**good, "LastPlayedDate": "2025-03-01T20:15:42Z"},
        {**good, "PlayCount": "1"},
        {**good, "IsFavorite": None},
    ]
    for bad in bad_values:
        with pytest.raises(AssertionError):
            spec.validate_schema("UserItemDataDto", bad)
    with pytest.raises(AssertionError):
        spec.validate_response("/Items", "GET", {"Items": [{"Type": "Sofa"}]})


@pytest.mark.parametrize("version", VERSIONS)
async def test_websocket_messages_validate(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    clock: ManualClock,
    version: str,
) -> None:
    spec = spec_validator(version)
    emu = await make_emulator(server_version=version, clock=clock)
    http = Http(session, emu)
    alice = emu.user_id("alice")
    token = emu.user_token("alice")
    movie = next(i for i in emu.leaf_items() if i.type == "Movie")
    episode = next(i for i in emu.leaf_items() if i.type == "Episode")
    async with session.ws_connect(f"{emu.url}/socket?ApiKey={token}") as ws:
        force = await next_message(ws)
        spec.validate_schema("ForceKeepAliveMessage", force)
        await ws.send_json({"MessageType": "KeepAlive"})
        spec.validate_schema("OutboundKeepAliveMessage", await next_message(ws))
        emu.save_user_data(alice, movie.id, rating=7, is_favorite=True, position_ticks=1000)
        emu.save_user_data(alice, episode.id, played=True, play_count=1, last_played=emu.now())
        await clock.advance(0.5)
        changed = await next_message(ws, "UserDataChanged")
        spec.validate_schema("UserDataChangedMessage", changed)
        listed = changed["Data"]["UserDataList"]
        assert {e["ItemId"] for e in listed} >= {movie.id, episode.id, episode.season_id}
        assert any("PlayedPercentage" in e for e in listed)
        emu.add_item("Movie", "Fresh", year=2025)
        await clock.advance(30)
        spec.validate_schema("LibraryChangedMessage", await next_message(ws, "LibraryChanged"))
        await ws.send_json({"MessageType": "SessionsStart", "Data": "0,1000"})
        await http.post("/Sessions/Playing", token=token, json_body={"ItemId": movie.id})
        sessions = await next_message(ws, "Sessions")
        spec.validate_schema("SessionsMessage", sessions)
        await ws.send_json({"MessageType": "SessionsStop"})
        for kind in ("ServerRestarting", "ServerShuttingDown"):
            await emu.send_server_message(kind)
            spec.validate_schema(f"{kind}Message", await next_message(ws, kind))
        await asyncio.sleep(0)
    assert token not in str(emu.requests)
    socket_record = next(r for r in emu.requests if r.is_websocket)
    assert socket_record.query == {"ApiKey": ["<redacted>"]}
    assert http.emu is emu
