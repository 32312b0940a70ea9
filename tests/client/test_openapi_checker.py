"""The OpenAPI request checker catches what the spec does not document, and only that."""

from __future__ import annotations

import aiohttp
import pytest

from jfsync.emulator import Emulator
from jfsync.jellyfin.api import auth_header
from tests.client.conftest import API_KEY
from tests.support.openapi_requests import RequestChecker, check_request, load_spec, spec_for

ITEM = "9f86d081884c7d659a2feaa0c55ad015"


def test_documented_requests_pass_and_undocumented_ones_are_named() -> None:
    spec = load_spec("10.10.7")
    assert check_request(spec, "GET", "/Items", {"userId": ["x"], "StartIndex": ["0"]}) is None
    assert check_request(spec, "GET", "/users/me", {}) is None  # routes are case-insensitive
    assert check_request(spec, "post", f"/UserItems/{ITEM}/UserData", {"UserId": ["u"]}) is None
    assert check_request(spec, "GET", "/socket", {"deviceId": ["d"]}) is None
    assert check_request(spec, "GET", f"/Users/u/Items/{ITEM}/UserData", {}) is None  # legacy
    assert check_request(spec, "GET", "/Items", {"bogus": ["1"]}) == (
        "query parameters not documented for GET /Items: ['bogus']"
    )
    assert check_request(spec, "POST", f"/UserPlayedItems/{ITEM}", {"nope": ["1"]}) == (
        "query parameters not documented for POST /UserPlayedItems/{itemId}: ['nope']"
    )
    assert check_request(spec, "PUT", "/System/Info", {}) == (
        "PUT is not documented for /System/Info (only GET)"
    )
    assert check_request(spec, "GET", "/Nowhere/At/All", {}) == (
        "route not in the OpenAPI file of 10.10.7"
    )


def test_each_version_uses_its_own_spec() -> None:
    old = spec_for("10.8.13")
    assert check_request(old, "GET", f"/UserItems/{ITEM}/UserData", {}) == (
        "route not in the OpenAPI file of 10.8.13"
    )
    assert check_request(old, "POST", "/QuickConnect/Initiate", {}) == (
        "POST is not documented for /QuickConnect/Initiate (only GET)"
    )
    assert check_request(spec_for("10.11.11"), "POST", "/QuickConnect/Initiate", {}) is None
    assert spec_for("12.0.0").version == "10.11.11"
    assert spec_for("10.9.11").version == "10.10.7"


@pytest.mark.parametrize("version", ["10.10.7", "10.11.11"])
async def test_checker_catches_undocumented_jfsync_requests_to_an_emulator(
    version: str, openapi_request_checker: RequestChecker
) -> None:
    async with (
        Emulator(
            api_key=API_KEY, users=[("alice", "pw")], library_size=5, server_version=version
        ) as emu,
        aiohttp.ClientSession() as http,
    ):
        jfsync = {"Authorization": auth_header("dev", API_KEY)}
        other = {"Authorization": auth_header("dev", API_KEY).replace('"jfsync"', '"other"', 1)}
        async with http.get(f"{emu.url}/Items", params={"bogusParam": "1"}, headers=jfsync):
            pass
        async with http.get(f"{emu.url}/Not/A/Route", headers=jfsync):
            pass
        async with http.get(f"{emu.url}/Users", params={"isHidden": "false"}, headers=jfsync):
            pass
        async with http.get(f"{emu.url}/Not/A/Route", headers=other):
            pass
    found = list(openapi_request_checker.violations)
    openapi_request_checker.violations.clear()  # expected here; must not fail this test
    assert found == [
        f"GET /Items (emulated {version}): query parameters not documented for GET /Items: "
        "['bogusparam']",
        f"GET /Not/A/Route (emulated {version}): route not in the OpenAPI file of "
        f"{'10.10.7' if version == '10.10.7' else '10.11.11'}",
    ]
    assert openapi_request_checker.checked == 3
