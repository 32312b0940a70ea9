"""Authentication and status codes of the emulator, as the fact sheet (§1.2, §4.3, §8) states."""

from __future__ import annotations

import aiohttp
import pytest

from jfsync.emulator import Emulator
from tests.emulator.conftest import API_KEY, Http, MakeEmulator, auth_header

pytestmark = pytest.mark.timeout(20)


async def login(http: Http, name: str, password: str, device_id: str = "dev-1") -> str:
    """Log in by name and return the access token."""
    reply = await http.post(
        "/Users/AuthenticateByName",
        token=None,
        device_id=device_id,
        json_body={"Username": name, "Pw": password},
    )
    assert reply.status == 200, reply.body
    token: str = reply.body["AccessToken"]
    return token


async def test_anonymous_routes_need_no_token(http: Http) -> None:
    info = await http.get("/System/Info/Public", token=None, headers={})
    assert info.status == 200
    assert info.body["Version"] == "10.10.7"
    assert info.body["Id"] == http.emu.server_id
    for method in ("GET", "POST"):
        ping = await http.call(method, "/System/Ping", headers={})
        assert (ping.status, ping.body) == (200, "Jellyfin Server")


async def test_rest_without_or_with_a_bad_token_is_401(http: Http) -> None:
    assert (await http.get("/System/Info", headers={})).status == 401
    assert (await http.get("/System/Info", token="0" * 32)).status == 401
    assert (await http.get("/Users", token="nonsense")).status == 401
    assert (await http.get("/System/Info")).status == 200


async def test_token_sources(make_emulator: MakeEmulator, session: aiohttp.ClientSession) -> None:
    emu = await make_emulator(server_version="10.10.7")
    http = Http(session, emu)
    ok = 200
    assert (await http.get("/System/Info", params={"ApiKey": API_KEY}, headers={})).status == ok
    assert (await http.get("/System/Info", params={"api_key": API_KEY}, headers={})).status == ok
    assert (await http.get("/System/Info", headers={"X-Emby-Token": API_KEY})).status == ok
    emby = {"Authorization": f'Emby Client="c", Token="{API_KEY}"'}
    assert (await http.get("/System/Info", headers=emby)).status == ok
    # Values are URL-decoded; key names are case-sensitive.
    encoded = {"Authorization": f'MediaBrowser Client="a%20b", Token="{API_KEY}"'}
    assert (await http.get("/System/Info", headers=encoded)).status == ok
    assert http.emu.requests[-1].client == "a b"
    lower = {"Authorization": f'MediaBrowser client="c", token="{API_KEY}"'}
    assert (await http.get("/System/Info", headers=lower)).status == 401


@pytest.mark.parametrize(
    ("version", "winner"), [("10.10.7", "x-emby"), ("10.11.11", "authorization")]
)
async def test_header_order_depends_on_version(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, version: str, winner: str
) -> None:
    emu = await make_emulator(server_version=version)
    http = Http(session, emu)
    # The header read first decides which device the server sees: visible as the session a
    # played-state write logs for its caller.
    item = emu.leaf_items()[0]
    reply = await http.call(
        "POST",
        f"/UserPlayedItems/{item.id}",
        params={"userId": emu.user_id("alice")},
        headers={
            "Authorization": (
                f'MediaBrowser Client="c", Device="d", DeviceId="from-authorization", '
                f'Version="1", Token="{API_KEY}"'
            ),
            "X-Emby-Authorization": (
                f'MediaBrowser Client="c", Device="d", DeviceId="from-x-emby", '
                f'Version="1", Token="{API_KEY}"'
            ),
        },
    )
    assert reply.status == 200
    devices = {s.device_id for s in emu.hub.sessions.values()}
    assert ("from-x-emby" in devices) == (winner == "x-emby")
    assert ("from-authorization" in devices) == (winner == "authorization")


async def test_v12_ignores_legacy_auth(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    emu = await make_emulator(server_version="12.0.0")
    http = Http(session, emu)
    assert (await http.get("/System/Info", params={"api_key": API_KEY}, headers={})).status == 401
    assert (await http.get("/System/Info", headers={"X-Emby-Token": API_KEY})).status == 401
    emby = {"Authorization": f'Emby Token="{API_KEY}"'}
    assert (await http.get("/System/Info", headers=emby)).status == 401
    assert (await http.get("/System/Info", params={"ApiKey": API_KEY}, headers={})).status == 200
    assert (await http.get("/System/Info")).status == 200


async def test_authenticate_by_name(http: Http) -> None:
    token = await login(http, "Alice", "alice-pw")
    me = await http.get("/Users/Me", token=token)
    assert me.status == 200
    assert me.body["Name"] == "alice"
    assert me.body["Policy"]["IsAdministrator"] is True
    # The Python client posts lower-case keys; REST bodies bind case-insensitively.
    lower = await http.post(
        "/Users/AuthenticateByName", token=None, json_body={"username": "bob", "pw": "bob-pw"}
    )
    assert lower.status == 200
    assert lower.body["User"]["Policy"]["IsAdministrator"] is False
    wrong = await http.post(
        "/Users/AuthenticateByName", token=None, json_body={"Username": "bob", "Pw": "nope"}
    )
    assert wrong.status == 401
    missing_fields = await http.post(
        "/Users/AuthenticateByName",
        headers={"Authorization": 'MediaBrowser Client="c", Device="d"'},
        json_body={"Username": "bob", "Pw": "bob-pw"},
    )
    assert missing_fields.status == 400
    assert (await http.get("/Users/Me")).status == 400  # an API key has no "me"


async def test_same_user_and_device_login_revokes_the_old_token(http: Http) -> None:
    first = await login(http, "bob", "bob-pw", device_id="tablet")
    other_device = await login(http, "bob", "bob-pw", device_id="phone")
    second = await login(http, "bob", "bob-pw", device_id="tablet")
    assert (await http.get("/Users/Me", token=first)).status == 401
    assert (await http.get("/Users/Me", token=second)).status == 200
    assert (await http.get("/Users/Me", token=other_device)).status == 200


async def test_non_admin_naming_another_user_is_403(http: Http) -> None:
    emu = http.emu
    bob_token = await login(http, "bob", "bob-pw")
    item = emu.leaf_items()[0]
    alice = emu.user_id("alice")
    bob = emu.user_id("bob")
    assert (
        await http.get(f"/UserItems/{item.id}/UserData", token=bob_token, params={"userId": alice})
    ).status == 403
    assert (
        await http.get(f"/UserItems/{item.id}/UserData", token=bob_token, params={"userId": bob})
    ).status == 200
    # Without userId a user token means its own user; an API key means Guid.Empty, which
    # GetUserById refuses with ArgumentException: 400 (Corrections 1).
    assert (await http.get(f"/UserItems/{item.id}/UserData", token=bob_token)).status == 200
    assert (await http.get(f"/UserItems/{item.id}/UserData")).status == 400
    assert (
        await http.get(f"/Users/{alice}/Items/{item.id}/UserData", token=bob_token)
    ).status == 403
    assert (await http.get("/Auth/Keys", token=bob_token)).status == 403


async def test_404_400_415_cases(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    item = emu.leaf_items()[0]
    unknown = "f" * 32
    cases = [
        ("GET", f"/UserItems/{unknown}/UserData", {"userId": alice}, None, 404),
        ("GET", f"/UserItems/{item.id}/UserData", {"userId": unknown}, None, 404),
        ("GET", f"/Users/{unknown}", None, None, 404),
        ("GET", f"/Items/{unknown}", None, None, 404),
        ("GET", "/UserItems/not-a-guid/UserData", {"userId": alice}, None, 400),
        ("GET", f"/UserItems/{item.id}/UserData", {"userId": "nope"}, None, 400),
        ("POST", f"/UserItems/{item.id}/UserData", {"userId": alice}, None, 400),
        ("POST", f"/UserItems/{item.id}/UserData", {"userId": alice}, {"Rating": 11}, 400),
        ("POST", f"/UserItems/{item.id}/UserData", {"userId": alice}, {"Rating": -1}, 400),
        ("POST", f"/UserItems/{item.id}/UserData", {"userId": alice}, {"PlayCount": "two"}, 400),
        ("POST", f"/UserItems/{item.id}/UserData", {"userId": alice}, [1, 2], 400),
        # Unknown enum values are dropped by the binder (Corrections 9): see test_binding.py.
        ("GET", "/Items", {"IncludeItemTypes": "Nonsense"}, None, 200),
        ("GET", "/Items", {"Filters": "IsWatched"}, None, 200),
        ("GET", "/Items", {"Recursive": "maybe"}, None, 400),
        ("GET", "/Nope/Nothing", None, None, 404),
        ("DELETE", "/System/Info/Public", None, None, 405),
    ]
    for method, path, params, body, status in cases:
        reply = await http.call(method, path, params=params, json_body=body)
        assert reply.status == status, (method, path, params, body, reply.status, reply.body)
    text = await http.call(
        "POST",
        f"/UserItems/{item.id}/UserData",
        params={"userId": alice},
        data='{"IsFavorite": true}',
        headers={**auth_header(API_KEY), "Content-Type": "text/plain"},
    )
    assert text.status == 415
    assert emu.user_data(alice, item.id).favorite is False


async def test_routes_and_parameters_are_case_insensitive(http: Http) -> None:
    alice = http.emu.user_id("alice")
    item = http.emu.leaf_items()[0]
    reply = await http.get(f"/useritems/{item.id.upper()}/userdata", params={"USERID": alice})
    assert reply.status == 200
    dashed = f"{item.id[:8]}-{item.id[8:12]}-{item.id[12:16]}-{item.id[16:20]}-{item.id[20:]}"
    assert (await http.get(f"/UserItems/{dashed}/UserData", params={"userId": alice})).status == 200


async def test_api_keys(http: Http) -> None:
    created = await http.post("/Auth/Keys", params={"app": "second"})
    assert created.status == 204
    listed = await http.get("/Auth/Keys")
    names = {row["AppName"]: row["AccessToken"] for row in listed.body["Items"]}
    assert set(names) == {"jfsync", "second"}
    new_key = names["second"]
    assert (await http.get("/System/Info", token=new_key)).status == 200
    assert (await http.delete(f"/Auth/Keys/{new_key}")).status == 204
    assert (await http.get("/System/Info", token=new_key)).status == 401
    assert http.emu.add_api_key("third") in http.emu.api_keys


async def test_quick_connect_flow_gives_a_working_user_token(http: Http) -> None:
    emu = http.emu
    bob = emu.user_id("bob")
    assert (await http.get("/QuickConnect/Enabled", headers={})).body is True
    started = await http.post("/QuickConnect/Initiate", token=None, device_id="jfsync-bob")
    assert started.status == 200
    secret, code = started.body["Secret"], started.body["Code"]
    assert started.body["Authenticated"] is False
    early = await http.post(
        "/Users/AuthenticateWithQuickConnect", token=None, json_body={"Secret": secret}
    )
    # An exchange before Authorize is 404 (Corrections 5).
    assert early.status == 404
    authorized = await http.post("/QuickConnect/Authorize", params={"code": code, "userId": bob})
    assert (authorized.status, authorized.body) == (200, True)
    state = await http.get("/QuickConnect/Connect", params={"secret": secret}, token=None)
    assert state.body["Authenticated"] is True
    result = await http.post(
        "/Users/AuthenticateWithQuickConnect", token=None, json_body={"Secret": secret}
    )
    assert result.status == 200
    token = result.body["AccessToken"]
    assert result.body["User"]["Id"] == bob
    assert result.body["SessionInfo"]["DeviceId"] == "jfsync-bob"
    me = await http.get("/Users/Me", token=token)
    assert me.body["Id"] == bob
    # The token was minted at Authorize: the exchange can be repeated and gives the same one.
    again = await http.post(
        "/Users/AuthenticateWithQuickConnect", token=None, json_body={"Secret": secret}
    )
    assert (again.status, again.body["AccessToken"]) == (200, token)


async def test_quick_connect_rules(http: Http) -> None:
    emu = http.emu
    alice = emu.user_id("alice")
    bob_token = emu.user_token("bob")
    started = await http.post("/QuickConnect/Initiate", token=None, device_id="x")
    code = started.body["Code"]
    # A non-admin may not authorise for someone else, and needs all four header fields.
    denied = await http.post(
        "/QuickConnect/Authorize", token=bob_token, params={"code": code, "userId": alice}
    )
    assert denied.status == 403
    partial = {"Authorization": 'MediaBrowser Client="c", DeviceId="d"'}
    assert (await http.post("/QuickConnect/Initiate", headers=partial)).status == 400
    assert (
        await http.post("/QuickConnect/Authorize", params={"code": "000000x", "userId": alice})
    ).status == 404
    emu.set_quick_connect(False)
    assert (await http.get("/QuickConnect/Enabled", headers={})).body is False
    assert (await http.post("/QuickConnect/Initiate", token=None)).status == 401
    assert (
        await http.post("/QuickConnect/Authorize", params={"code": code, "userId": alice})
    ).status == 401


async def test_users_listing(http: Http) -> None:
    reply = await http.get("/Users", token=http.emu.user_token("carol"))
    assert [u["Name"] for u in reply.body] == ["alice", "bob", "carol"]
    one = await http.get(f"/Users/{http.emu.user_id('bob')}")
    assert one.body["Name"] == "bob"


async def test_ids_are_stable_and_versions_differ(make_emulator: MakeEmulator) -> None:
    a = await make_emulator(server_name="a")
    b = await make_emulator(server_name="b")
    same = await make_emulator(server_name="a", port=0)
    assert a.server_id != b.server_id
    assert a.user_id("alice") != b.user_id("alice")
    assert a.server_id == same.server_id
    assert isinstance(a, Emulator)


async def test_user_token_helper_mints_independent_tokens(http: Http) -> None:
    emu = http.emu
    first, second = emu.user_token("carol"), emu.user_token("carol")
    assert (await http.get("/Users/Me", token=first)).status == 200
    assert (await http.get("/Users/Me", token=second)).body["Name"] == "carol"
    emu.user_token("carol", device_id="shared")
    again = emu.user_token("carol", device_id="shared")
    assert sum(1 for t in emu.tokens.values() if t.device_id == "shared") == 1
    assert (await http.get("/Users/Me", token=again)).status == 200
