"""Per-user access tokens: where they are kept (:class:`TokenStore`) and how they are obtained.

jfsync hears a user's ``UserDataChanged`` only on a websocket authenticated as that user (design
"Hard facts" 1), so it needs one token per (server, user). :class:`UserTokens` hands them out:
a token or password configured for the user wins; otherwise a token stored earlier is reused
(across restarts, once the ledger implements the store); otherwise the admin API key mints one
through Quick Connect. Each user's token is bound to its own device id,
``jfsync-<serverId>-<userId>``, which the user's websocket uses too; ``jfsync watch`` uses
ids of its own (:func:`watch_device_id`), so running it never takes the replicator's session.
Tokens never appear in reprs, logs or messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from jfsync.config import UserCredentials
from jfsync.errors import ServerError
from jfsync.ids import normalize_id
from jfsync.jellyfin.api import JellyfinClient, QuickConnectUnavailableError
from jfsync.logs import SCRUBBER

logger = logging.getLogger(__name__)


class TokenStore(Protocol):
    """Durable home of minted per-user tokens (the ledger implements it)."""

    async def load_token(self, server_id: str, user_id: str) -> str | None:
        """Return the stored token of a user on a server, or None."""
        ...

    async def save_token(self, server_id: str, user_id: str, token: str) -> None:
        """Store (or replace) the token of a user on a server."""
        ...

    async def forget_token(self, server_id: str, user_id: str) -> None:
        """Drop the stored token of a user on a server, if any."""
        ...


class MemoryTokenStore:
    """A TokenStore in memory, for tests and until the ledger holds tokens."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        return f"MemoryTokenStore({len(self._tokens)} tokens)"

    async def load_token(self, server_id: str, user_id: str) -> str | None:
        """Return the stored token, or None."""
        return self._tokens.get((normalize_id(server_id), normalize_id(user_id)))

    async def save_token(self, server_id: str, user_id: str, token: str) -> None:
        """Store the token."""
        self._tokens[(normalize_id(server_id), normalize_id(user_id))] = token

    async def forget_token(self, server_id: str, user_id: str) -> None:
        """Drop the token."""
        self._tokens.pop((normalize_id(server_id), normalize_id(user_id)), None)


class TokenUnavailableError(ServerError):
    """No token can be had for a user on a server; the message names the config fix."""

    def __init__(self, server: str, user_name: str, message: str) -> None:
        self.user_name = user_name
        super().__init__(server, message)


def user_device_id(server_id: str, user_id: str) -> str:
    """Return the device id of a user's token and websocket: ``jfsync-<serverId>-<userId>``."""
    return f"jfsync-{normalize_id(server_id)}-{normalize_id(user_id)}"


def watch_device_id(server_id: str, user_id: str) -> str:
    """The device id of ``jfsync watch``'s token and websocket for a user.

    ``jfsync-watch-<serverId>-<userId>``: stable across watch runs, never one ``jfsync run``
    uses. Jellyfin keeps one session per device, and a new token for a device revokes the
    old one: with run's device ids, starting ``watch`` would take the replicator's events
    and revoke its tokens.
    """
    return f"jfsync-watch-{normalize_id(server_id)}-{normalize_id(user_id)}"


def watch_rest_device_id(server_name: str) -> str:
    """The device id of ``jfsync watch``'s REST calls to a server (``jfsync run`` uses
    ``jfsync-rest-<name>``)."""
    return f"jfsync-watch-rest-{server_name}"


#: Gives the device id of a user's token and socket from (server id, user id).
DeviceIdFor = Callable[[str, str], str]


class UserTokens:
    """Hand out a working token per user of one server, minting and storing as needed."""

    def __init__(
        self,
        client: JellyfinClient,
        store: TokenStore,
        server_id: str,
        credentials: Mapping[str, UserCredentials],
        *,
        config_key: str = "servers[i]",
        device_id: DeviceIdFor = user_device_id,
    ) -> None:
        self.client = client
        #: The device id each user's token is minted (or logged in) for.
        self.device_id = device_id
        self.store = store
        self.server_id = normalize_id(server_id)
        self._credentials = {name.casefold(): cred for name, cred in credentials.items()}
        self._config_key = config_key
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"UserTokens(server={self.client.name!r})"

    def source_for(self, user_name: str) -> str:
        """Say where a user's token comes from: ``token``, ``password`` or ``quick_connect``."""
        cred = self._credentials.get(user_name.casefold())
        if cred is not None and cred.token is not None:
            return "token"
        if cred is not None and cred.password is not None:
            return "password"
        return "quick_connect"

    async def token_for(self, user_id: str, user_name: str, *, refresh: bool = False) -> str:
        """Return a token for the user; ``refresh=True`` replaces a token the server rejected.

        Order: the configured token; else (with a configured password) the stored token or a
        new login; else the stored token or a new one minted through Quick Connect. A refresh
        forgets the stored token first. A configured token cannot be refreshed: a refresh of
        it raises TokenUnavailableError naming the config key to fix.
        """
        user_id = normalize_id(user_id)
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            token = await self._token_for(user_id, user_name, refresh=refresh)
        # Minted and stored tokens are unknown to the config: keep them out of every log line.
        SCRUBBER.add([token])
        return token

    async def _token_for(self, user_id: str, user_name: str, *, refresh: bool) -> str:
        cred = self._credentials.get(user_name.casefold())
        key = f"{self._config_key}.users.{user_name}"
        if cred is not None and cred.token is not None:
            if refresh:
                raise TokenUnavailableError(
                    self.client.name,
                    user_name,
                    f"the token configured for user {user_name!r} was rejected; "
                    f"put a valid one in {key}.token",
                )
            return cred.token.get_secret_value()
        if refresh:
            await self.store.forget_token(self.server_id, user_id)
        else:
            stored = await self.store.load_token(self.server_id, user_id)
            if stored:
                return stored
        device_id = self.device_id(self.server_id, user_id)
        if cred is not None and cred.password is not None:
            token = await self._login(user_id, user_name, cred.password.get_secret_value(), key)
            how = "logged in with the configured password"
        else:
            token = await self._mint(user_id, user_name, device_id, key)
            how = "minted through Quick Connect"
        await self.store.save_token(self.server_id, user_id, token)
        logger.info("[%s] token for user %s %s", self.client.name, user_name, how)
        return token

    async def _login(self, user_id: str, user_name: str, password: str, key: str) -> str:
        device_id = self.device_id(self.server_id, user_id)
        got_id, token = await self.client.authenticate_by_name(user_name, password, device_id)
        if got_id != user_id:
            raise TokenUnavailableError(
                self.client.name,
                user_name,
                f"logging in as {user_name!r} gave another user's token; check {key}",
            )
        return token

    async def _mint(self, user_id: str, user_name: str, device_id: str, key: str) -> str:
        try:
            return await self.client.mint_user_token(user_id, device_id)
        except QuickConnectUnavailableError:
            raise TokenUnavailableError(
                self.client.name,
                user_name,
                f"Quick Connect is disabled on this server, so jfsync cannot get a token for "
                f"user {user_name!r}; enable Quick Connect (Dashboard > General) or set "
                f"{key}.token or {key}.password",
            ) from None
