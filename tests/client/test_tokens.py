"""Per-user tokens: Quick Connect minting, reuse from the store, refresh, and config fallbacks."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from pydantic import SecretStr

from jfsync.config import UserCredentials
from jfsync.emulator import Emulator
from jfsync.errors import AuthRejectedError
from jfsync.jellyfin.api import JellyfinClient
from jfsync.sync.tokens import MemoryTokenStore, TokenUnavailableError, UserTokens, user_device_id
from tests.client.conftest import SECRETS, USERS, MakeClient, MakeEmulator

PASSWORDS = dict(USERS)


def _tokens(
    emu: Emulator,
    client: JellyfinClient,
    store: MemoryTokenStore | None = None,
    **credentials: UserCredentials,
) -> UserTokens:
    return UserTokens(
        client, store or MemoryTokenStore(), emu.server_id, credentials, config_key="servers[1]"
    )


def _requests_to(emu: Emulator, path: str) -> int:
    return sum(1 for r in emu.requests if r.path == path)


def test_user_device_id_is_stable_and_normalised() -> None:
    server = "5F0D" + "0" * 28
    user = "4bd7d5a1-e0c4-4f6a-9b0d-3c2e1f0a9b8c"
    assert user_device_id(server, user) == (
        "jfsync-5f0d0000000000000000000000000000-4bd7d5a1e0c44f6a9b0d3c2e1f0a9b8c"
    )


async def test_quick_connect_mints_a_working_token_for_that_user(
    emu: Emulator, client: JellyfinClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bob = emu.user_id("bob")
    store = MemoryTokenStore()
    tokens = _tokens(emu, client, store)
    assert tokens.source_for("bob") == "quick_connect"
    token = await tokens.token_for(bob, "bob")
    assert token not in SECRETS
    me = await client.current_user(token)
    assert me.id == bob
    assert await store.load_token(emu.server_id, bob) == token
    assert token not in repr(store)
    assert token not in repr(tokens)
    assert "token for user bob minted through Quick Connect" in caplog.text
    assert token not in caplog.text
    # The three Quick Connect steps, the first and last as the user's own device without token.
    assert [r.path for r in emu.requests if "QuickConnect" in r.path] == [
        "/QuickConnect/Initiate",
        "/QuickConnect/Authorize",
        "/Users/AuthenticateWithQuickConnect",
    ]


async def test_each_user_gets_their_own_token(emu: Emulator, client: JellyfinClient) -> None:
    tokens = _tokens(emu, client)
    alice_token = await tokens.token_for(emu.user_id("alice"), "alice")
    bob_token = await tokens.token_for(emu.user_id("bob"), "bob")
    assert alice_token != bob_token
    assert (await client.current_user(alice_token)).name == "alice"
    assert (await client.current_user(bob_token)).name == "bob"


async def test_stored_token_is_reused_across_restarts(
    emu: Emulator, make_client: MakeClient
) -> None:
    store = MemoryTokenStore()
    bob = emu.user_id("bob")
    first = await _tokens(emu, make_client(emu), store).token_for(bob, "bob")
    # A new process: new client and provider, same durable store; nothing is minted.
    initiated = _requests_to(emu, "/QuickConnect/Initiate")
    second = await _tokens(emu, make_client(emu), store).token_for(bob, "bob")
    assert second == first
    assert _requests_to(emu, "/QuickConnect/Initiate") == initiated


async def test_refresh_replaces_a_revoked_token(emu: Emulator, client: JellyfinClient) -> None:
    store = MemoryTokenStore()
    tokens = _tokens(emu, client, store)
    bob = emu.user_id("bob")
    old = await tokens.token_for(bob, "bob")
    # Someone logs in as bob on the same device id: the server revokes the old token (§8.2).
    await client.authenticate_by_name("bob", PASSWORDS["bob"], user_device_id(emu.server_id, bob))
    with pytest.raises(AuthRejectedError):
        await client.current_user(old)
    # Without refresh the stored (dead) token comes back; with refresh a new one is minted.
    assert await tokens.token_for(bob, "bob") == old
    new = await tokens.token_for(bob, "bob", refresh=True)
    assert new != old
    assert (await client.current_user(new)).id == bob
    assert await store.load_token(emu.server_id, bob) == new


async def test_quick_connect_disabled_names_the_config_alternative(
    make_emulator: MakeEmulator, make_client: MakeClient
) -> None:
    emu = await make_emulator(quick_connect=False)
    client = make_client(emu)
    assert await client.quick_connect_enabled() is False
    store = MemoryTokenStore()
    with pytest.raises(TokenUnavailableError) as caught:
        await _tokens(emu, client, store).token_for(emu.user_id("bob"), "bob")
    message = str(caught.value)
    assert "Quick Connect is disabled" in message
    assert "servers[1].users.bob.token" in message
    assert "servers[1].users.bob.password" in message
    assert caught.value.user_name == "bob"
    assert await store.load_token(emu.server_id, emu.user_id("bob")) is None
    # Turned on again, the same provider succeeds.
    emu.set_quick_connect(True)
    assert await client.quick_connect_enabled() is True
    token = await _tokens(emu, client, store).token_for(emu.user_id("bob"), "bob")
    assert (await client.current_user(token)).name == "bob"


async def test_configured_password_logs_in_without_quick_connect(
    make_emulator: MakeEmulator, make_client: MakeClient
) -> None:
    emu = await make_emulator(quick_connect=False)
    client = make_client(emu)
    store = MemoryTokenStore()
    carol = emu.user_id("Carol")
    # Config names are matched without case: "carol" in the config is the server's "Carol".
    cred = UserCredentials(password=SecretStr(PASSWORDS["Carol"]))
    tokens = _tokens(emu, client, store, carol=cred)
    assert tokens.source_for("Carol") == "password"
    token = await tokens.token_for(carol, "Carol")
    assert (await client.current_user(token)).id == carol
    assert _requests_to(emu, "/QuickConnect/Initiate") == 0
    assert await tokens.token_for(carol, "Carol") == token  # stored, no second login
    logins = _requests_to(emu, "/Users/AuthenticateByName")
    assert logins == 1
    fresh = await tokens.token_for(carol, "Carol", refresh=True)
    assert fresh != token
    assert (await client.current_user(fresh)).id == carol


async def test_wrong_configured_password_is_auth_rejected(
    emu: Emulator, client: JellyfinClient
) -> None:
    cred = UserCredentials(password=SecretStr("not-the-password"))
    with pytest.raises(AuthRejectedError) as caught:
        await _tokens(emu, client, bob=cred).token_for(emu.user_id("bob"), "bob")
    assert "not-the-password" not in str(caught.value)


async def test_configured_token_wins_and_cannot_be_refreshed(
    emu: Emulator, client: JellyfinClient
) -> None:
    given = emu.user_token("bob")
    tokens = _tokens(emu, client, bob=UserCredentials(token=SecretStr(given)))
    assert tokens.source_for("bob") == "token"
    assert await tokens.token_for(emu.user_id("bob"), "bob") == given
    with pytest.raises(TokenUnavailableError) as caught:
        await tokens.token_for(emu.user_id("bob"), "bob", refresh=True)
    assert "servers[1].users.bob.token" in str(caught.value)
    assert given not in str(caught.value)
    assert _requests_to(emu, "/QuickConnect/Initiate") == 0


async def test_a_minted_token_is_the_one_quick_connect_authorised(
    emu: Emulator, client: JellyfinClient
) -> None:
    # On a real server the token and its session are minted at Authorize; the exchange only
    # hands that token over. jfsync must end up with exactly that token, on the user's device.
    bob = emu.user_id("bob")
    token = await _tokens(emu, client).token_for(bob, "bob")
    device = user_device_id(emu.server_id, bob)
    on_device = [t.token for t in emu.tokens.values() if t.device_id == device]
    assert on_device == [token]
    assert (await client.current_user(token)).id == bob


async def test_a_quick_connect_refresh_ends_the_old_token_and_its_socket(
    emu: Emulator, client: JellyfinClient, http: aiohttp.ClientSession
) -> None:
    bob = emu.user_id("bob")
    store = MemoryTokenStore()
    tokens = _tokens(emu, client, store)
    old = await tokens.token_for(bob, "bob")
    device = user_device_id(emu.server_id, bob)
    header = (
        f'MediaBrowser Client="jfsync", Device="jfsync", DeviceId="{device}", '
        f'Version="0.1.0", Token="{old}"'
    )
    async with http.ws_connect(f"{emu.url}/socket", headers={"Authorization": header}) as ws:
        first = await ws.receive_json(timeout=5)
        assert first["MessageType"] == "ForceKeepAlive"
        new = await tokens.token_for(bob, "bob", refresh=True)
        # Authorize on the same device logged the old token out: its socket is closed cleanly.
        async with asyncio.timeout(5):
            msg = await ws.receive()
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            1000,
            "System Shutdown",
        )
    assert new != old
    with pytest.raises(AuthRejectedError):
        await client.current_user(old)
    assert (await client.current_user(new)).id == bob
    assert await store.load_token(emu.server_id, bob) == new
    assert [t.token for t in emu.tokens.values() if t.device_id == device] == [new]
