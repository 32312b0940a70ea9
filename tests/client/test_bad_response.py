"""Bodies that do not parse become BadResponseError naming server, route and field.

The emulator always answers well-formed JSON, so these tests serve broken bodies from a tiny
aiohttp app on loopback (a real socket, not a mock of aiohttp).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from jfsync.errors import BadResponseError, is_retryable
from jfsync.jellyfin.api import JellyfinClient
from jfsync.model import PlayState, Register, UserData

KEY = "feedfacefeedfacefeedfacefeedface"
ITEM = "9f86d081884c7d659a2feaa0c55ad015"
USER = "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"


@pytest.fixture
async def broken_server() -> AsyncIterator[Callable[[str, str], str]]:
    """Serve fixed bodies on given paths; yields ``serve(path, body) -> base url``."""
    bodies: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        assert f'Token="{KEY}"' in request.headers.get("Authorization", "") or (
            request.path == "/System/Info/Public"
        )
        return web.Response(text=bodies[request.path], content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    def serve(path: str, body: str) -> str:
        bodies[path] = body
        return f"http://127.0.0.1:{port}"

    yield serve
    await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "body", "call", "route", "problem"),
    [
        (
            f"/UserItems/{ITEM}/UserData",
            '{"PlayCount": "many", "IsFavorite": true}',
            "get_user_data",
            "/UserItems/{itemId}/UserData",
            "field PlayCount:",
        ),
        (
            "/Users",
            '[{"Name": "alice", "Id": "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"}, {"Name": "bob", "Id": "nope"}]',
            "users",
            "/Users",
            "field [1].Id: not a Jellyfin id",
        ),
        ("/Users", "<html>proxy error</html>", "users", "/Users", "the body is not JSON"),
        (
            "/Items",
            '{"Items": [{"Name": "x"}], "TotalRecordCount": 1}',
            "items",
            "/Items",
            "field Items[0].Id: Field required",
        ),
        (
            # A page is validated a step at a time: a bad item deep in it is still named by
            # its place in the whole page.
            "/Items",
            '{"Items": ['
            + ", ".join(
                f'{{"Id": "{n:032x}", "Name": "x"}}' if n != 150 else '{"Name": "x", "Id": 7}'
                for n in range(1, 300)
            )
            + '], "TotalRecordCount": 299}',
            "items",
            "/Items",
            "field Items[149].Id: ",
        ),
        ("/Items", "[]", "items", "/Items", "field (body): "),
        (
            "/Items",
            '{"Items": [{"Id": "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c", "UserData": {"PlayCount": '
            '"many"}}]}',
            "user_data_of",
            "/Items",
            "field Items[0].UserData.PlayCount: ",
        ),
        ("/Items", "<html>proxy error</html>", "user_data_of", "/Items", "the body is not JSON"),
        ("/Items", " ", "user_data_of", "/Items", "the body is empty"),
        ("/Items", "<html>proxy error</html>", "items", "/Items", "the body is not JSON"),
        (
            # The catch-up's listing (ids and user data only) names the field as well.
            "/Items",
            '{"Items": [{"Id": "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c", "UserData": {"PlayCount": '
            '"many"}}]}',
            "user_data_list",
            "/Items",
            "field Items[0].UserData.PlayCount: ",
        ),
        (
            "/Items",
            '{"Items": [{"Name": "x"}]}',
            "user_data_list",
            "/Items",
            "field Items[0].Id: Field required",
        ),
        ("/Items", "<html>proxy error</html>", "user_data_list", "/Items", "the body is not JSON"),
        ("/Items", " ", "items", "/Items", "the body is empty"),
        (
            "/System/Info/Public",
            '{"Version": "ten", "Id": "4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"}',
            "version",
            "/System/Info/Public",
            "field Version: not a version",
        ),
    ],
)
async def test_bad_body_names_route_and_field(
    broken_server: Callable[[str, str], str],
    path: str,
    body: str,
    call: str,
    route: str,
    problem: str,
) -> None:
    url = broken_server(path, body)
    async with aiohttp.ClientSession() as session:
        client = JellyfinClient("broken", url, KEY, session=session, device_id="d")
        with pytest.raises(BadResponseError) as caught:
            await _call(client, call)
    err = caught.value
    assert err.server == "broken"
    assert err.route == route
    assert problem in err.problem
    assert str(err).startswith(f"[broken] unexpected response from {route}: ")
    assert KEY not in str(err)
    assert not is_retryable(err)


async def _call(client: JellyfinClient, call: str) -> None:
    if call == "get_user_data":
        await client.get_user_data(USER, ITEM)
    elif call == "users":
        await client.users()
    elif call == "items":
        _ = [i async for i in client.iter_items(USER)]
    elif call == "user_data_of":
        await client.user_data_of(USER, [ITEM])
    elif call == "user_data_list":
        _ = [i async for i in client.iter_user_data(USER)]
    else:
        await client.server_version()


@pytest.mark.parametrize(
    ("body", "problem"),
    [("<html>proxy error</html>", "the body is not JSON"), ("", "the body is empty")],
)
async def test_a_write_answered_by_a_page_is_not_taken_as_made(
    broken_server: Callable[[str, str], str], body: str, problem: str
) -> None:
    """The pusher's write does not read the answer's fields, but a proxy's page answering
    200 is still an error: the write is not recorded as made (it is retried)."""
    url = broken_server(f"/UserItems/{ITEM}/UserData", body)
    played = UserData(play_state=PlayState(played=True, play_count=1, last_played_s=1_700_000_000))
    async with aiohttp.ClientSession() as session:
        client = JellyfinClient("broken", url, KEY, session=session, device_id="d")
        with pytest.raises(BadResponseError) as caught:
            await client.write_user_data(
                USER, ITEM, played, UserData(), frozenset({Register.PLAY_STATE})
            )
    assert caught.value.route == "/UserItems/{itemId}/UserData"
    assert problem in caught.value.problem
    assert KEY not in str(caught.value)
