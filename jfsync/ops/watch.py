"""``jfsync watch``: print every user's live websocket events from real servers, one per line.

A debugging aid for a real setup: for each configured server (or the one named with
``--server``) it lists the users with the admin API key, gets each user a token (configured
token or password, else Quick Connect; kept in memory only), opens one
:class:`~jfsync.sync.subscriber.Subscriber` per user and prints what arrives until Ctrl-C::

    2026-11-22T10:15:42Z alpha alice 9f86d081884c7d659a2feaa0c55ad015 played=yes count=1 ...
    2026-11-22T10:15:42Z alpha alice 1b4f0e9851971998e732078544c96b36 folder unplayed=6 ...
    2026-11-22T10:16:03Z alpha bob library added=1 removed=0 updated=2 ...
    2026-11-22T10:16:10Z alpha bob state=backoff (connection lost: ...)

Nothing is written to any server and nothing is stored. Tokens never reach the output.
``watch`` has device ids of its own (:func:`~jfsync.sync.tokens.watch_device_id`, and
``jfsync-watch-rest-<server>`` for REST), distinct from ``jfsync run``'s and stable across
runs: Jellyfin keeps one session per device, so with run's ids it would take the replicator's
events and revoke its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import aiohttp

from jfsync.config import Config, ServerConfig, load_config_or_report
from jfsync.errors import BadResponseError, JfsyncError
from jfsync.jellyfin.api import JellyfinClient
from jfsync.logs import configure_logging
from jfsync.model import TICKS_PER_SECOND
from jfsync.sync.subscriber import (
    ConnectionStateChanged,
    GetToken,
    LibraryChangedEvent,
    Subscriber,
    SubscriberEvent,
    UserDataChangedEvent,
    UserDataEntry,
)
from jfsync.sync.tokens import MemoryTokenStore, UserTokens, watch_device_id, watch_rest_device_id
from jfsync.timing import Clock, SystemClock

#: Exit status for a config that does not validate (the same as ``jfsync check``).
EXIT_CONFIG = 2
#: Exit status when no server could be watched at all.
EXIT_NOTHING_TO_WATCH = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``watch`` options to ``parser``."""
    parser.add_argument("--config", "-c", required=True, help="path to the YAML config")
    parser.add_argument(
        "--server", metavar="NAME", help="watch only this server (default: every server)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``jfsync watch`` until Ctrl-C; return the exit status."""
    config = load_config_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    names = [s.name for s in config.servers]
    if args.server is not None and args.server not in names:
        print(
            f"--server {args.server}: no such server in {args.config}; "
            f"expected one of {', '.join(names)}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    configure_logging(config.logging.level, secrets=config.secret_values())
    selected = [args.server] if args.server is not None else names
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(watch(config, selected, out=sys.stdout, err=sys.stderr))
    return 0


async def watch(
    config: Config,
    server_names: Sequence[str],
    *,
    out: TextIO,
    err: TextIO,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Watch ``server_names`` until ``stop`` is set (default: SIGINT or SIGTERM)."""
    clock = clock or SystemClock()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
    try:
        async with aiohttp.ClientSession() as session:
            watcher = Watcher(config, server_names, out=out, err=err, clock=clock)
            started = await watcher.start(session)
            if not started:
                print("nothing to watch: no server could be reached", file=err)
                return EXIT_NOTHING_TO_WATCH
            print("watching; press Ctrl-C to stop", file=err, flush=True)
            try:
                await stop.wait()
            finally:
                await watcher.stop()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return 0


class Watcher:
    """The subscribers of ``jfsync watch`` and the printer they feed."""

    def __init__(
        self, config: Config, server_names: Sequence[str], *, out: TextIO, err: TextIO, clock: Clock
    ) -> None:
        self.config = config
        self.server_names = list(server_names)
        self.subscribers: list[Subscriber] = []
        self._out = out
        self._err = err
        self._clock = clock
        self._names: dict[tuple[str, str], str] = {}  # (server, user id) -> user name

    async def start(self, session: aiohttp.ClientSession) -> int:
        """Set up and start a subscriber per user of every server; return how many started."""
        for index, server in enumerate(self.config.servers):
            if server.name not in self.server_names:
                continue
            try:
                await self._start_server(index, server, session)
            except JfsyncError as error:
                print(f"{server.name}: cannot watch: {error}", file=self._err, flush=True)
        return len(self.subscribers)

    async def stop(self) -> None:
        """Stop every subscriber and wait for them."""
        for sub in self.subscribers:
            await sub.stop()

    async def _start_server(
        self, index: int, server: ServerConfig, session: aiohttp.ClientSession
    ) -> None:
        client = JellyfinClient.for_server(
            server, session=session, device_id=watch_rest_device_id(server.name)
        )
        info = await client.ensure_supported()
        server_id = info.id
        if server_id is None:
            server_id = (await client.system_info()).id
        if server_id is None:
            raise BadResponseError(server.name, "/System/Info/Public", "field Id: missing")
        excluded = {name.casefold() for name in self.config.users.exclude}
        users = [
            u
            for u in await client.users()
            if not u.is_disabled and u.name.casefold() not in excluded
        ]
        tokens = UserTokens(
            client,
            MemoryTokenStore(),
            server_id,
            server.users,
            config_key=f"servers[{index}]",
            device_id=watch_device_id,
        )
        for user in users:
            self._names[(server.name, user.id)] = user.name
            sub = Subscriber(
                server.name,
                server.url,
                user.id,
                user.name,
                watch_device_id(server_id, user.id),
                get_token=_token_getter(tokens, user.id, user.name),
                on_event=self._print,
                resync=_nothing_to_resync,
                clock=self._clock,
            )
            self.subscribers.append(sub)
            sub.start()
        names = ", ".join(u.name for u in users) or "no users"
        print(
            f"{server.name}: Jellyfin {info.version}, watching {names}", file=self._err, flush=True
        )

    async def _print(self, event: SubscriberEvent) -> None:
        for line in format_event(event, self._names, self._clock.wall_ms()):
            print(line, file=self._out, flush=True)


def format_event(
    event: SubscriberEvent, names: dict[tuple[str, str], str], now_ms: int
) -> list[str]:
    """Render one event as output lines: time, server, user name, then the event's fields."""
    when = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    user = names.get((event.server, event.user_id), event.user_id)
    head = f"{when} {event.server} {user}"
    if isinstance(event, UserDataChangedEvent):
        return [f"{head} {entry.item_id} {_entry_fields(entry)}" for entry in event.entries]
    if isinstance(event, LibraryChangedEvent):
        parts = [
            f"added={len(event.items_added)}",
            f"removed={len(event.items_removed)}",
            f"updated={len(event.items_updated)}",
        ]
        ids = [*event.items_added, *event.items_removed, *event.items_updated]
        return [f"{head} library {' '.join(parts)}" + (f" items={','.join(ids)}" if ids else "")]
    assert isinstance(event, ConnectionStateChanged)
    reason = f" ({event.reason})" if event.reason else ""
    return [f"{head} state={event.state}{reason}"]


def _entry_fields(entry: UserDataEntry) -> str:
    data = entry.data
    state = data.play_state
    fields = []
    if entry.is_folder:
        fields.append(f"folder unplayed={entry.unplayed_item_count}")
    fields += [
        f"played={_yes(state.played)}",
        f"count={state.play_count}",
        f"position={_position(state.position_ticks)}",
        f"favorite={_yes(data.favorite)}",
        f"rating={'-' if data.rating is None else f'{data.rating:g}'}",
        "last_played="
        + (
            "-"
            if state.last_played_s is None
            else datetime.fromtimestamp(state.last_played_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
    ]
    return " ".join(fields)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _position(ticks: int) -> str:
    seconds = ticks // TICKS_PER_SECOND
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _token_getter(tokens: UserTokens, user_id: str, user_name: str) -> GetToken:
    async def get_token(refresh: bool) -> str:
        token = await tokens.token_for(user_id, user_name, refresh=refresh)
        return token

    return get_token


async def _nothing_to_resync() -> None:
    """``watch`` keeps no state, so there is nothing to catch up after a reconnect."""
