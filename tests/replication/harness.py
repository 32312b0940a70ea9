"""Helpers for the replication tests: emulated clusters, convergence checks and a quiet barrier.

A :class:`Cluster` is two or three emulators generated from the same seed and path root (so
they share item ids, as identical libraries do) with distinct server names, plus the
:class:`SyncService` that replicates between them. :func:`settle` is the barrier the
no-ping-pong tests rely on: it sends one sentinel change through every server's socket and
waits until every resulting write's echo came back, so every message sent before it has been
applied and any write it caused has been made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from jfsync import emulator as emulator_module
from jfsync.config import Config
from jfsync.emulator import Emulator, RequestRecord, WriteRecord
from jfsync.model import UserData
from jfsync.service import SyncService
from jfsync.timing import ManualClock, backoff_delays

API_KEY = "0123456789abcdef0123456789abcdef"
USER = "alice"
#: The canonical key jfsync gives a user matched by name.
USER_KEY = f"name:{USER}"
#: Real-time bound for one wait on loopback I/O and the service; never a wait for time.
WAIT_S = 20.0
#: Small emulator echo debounce: real time is unavoidable there, so keep it short.
DEBOUNCE_S = 0.02
#: Make every pusher wait in real time as little as possible.
FAST_PUSHER: dict[str, Any] = {
    "retry_initial_s": 0.005,
    "retry_max_s": 0.02,
    "probe_initial_s": 0.01,
    "probe_max_s": 0.05,
    "auth_retry_s": 0.05,
    "idle_poll_s": 1.0,
    "fault_initial_s": 0.01,
    "fault_max_s": 0.05,
}


def fast_delays() -> Any:
    """Reconnect delays for subscribers in tests (tens of milliseconds)."""
    return backoff_delays(base_s=0.01, cap_s=0.05)


FAST_SUBSCRIBER: dict[str, Any] = {"delays": fast_delays}


def make_config(
    emus: Sequence[Emulator],
    ledger: Path,
    url_of: Callable[[Emulator], str] | None = None,
    sync: dict[str, Any] | None = None,
    servers: dict[str, dict[str, Any]] | None = None,
    users: dict[str, Any] | None = None,
) -> Config:
    """Build a config syncing every emulator (config order = list order); ``sync`` adds keys
    to the config's ``sync`` section, ``servers`` to a server's entry (by name), ``users`` to
    the ``users`` section."""
    return Config.model_validate(config_dict(emus, ledger, url_of, sync, servers, users))


def config_dict(
    emus: Sequence[Emulator],
    ledger: Path,
    url_of: Callable[[Emulator], str] | None = None,
    sync: dict[str, Any] | None = None,
    servers: dict[str, dict[str, Any]] | None = None,
    users: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of :func:`make_config` as plain data (to edit, or write as YAML)."""
    return {
        "ledger": str(ledger),
        "servers": [
            {
                "name": emu.server_name,
                "url": url_of(emu) if url_of else emu.url,
                "api_key": API_KEY,
                "timeout_s": 5,
                **(servers or {}).get(emu.server_name, {}),
            }
            for emu in emus
        ],
        "sync": {"shutdown_grace": 2, **(sync or {})},
        "users": users or {},
    }


def config_yaml(emus: Sequence[Emulator], ledger: Path, grace_s: float = 5.0) -> str:
    """The same config as YAML, for a ``jfsync run`` subprocess."""
    lines = [f"ledger: {ledger}", "logging:", "  level: warning", "sync:"]
    lines.append(f"  shutdown_grace: {grace_s}")
    lines.append("servers:")
    for emu in emus:
        lines += [
            f"  - name: {emu.server_name}",
            f"    url: {emu.url}",
            f"    api_key: {API_KEY}",
            "    timeout_s: 5",
        ]
    return "\n".join(lines) + "\n"


def new_emulator(
    name: str, leaves: int = 40, debounce_s: float = DEBOUNCE_S, **kw: Any
) -> Emulator:
    """An emulator sharing the library layout (and so the item ids) of every other one."""
    return Emulator(
        api_key=API_KEY,
        server_name=name,
        library_size=leaves,
        seed=7,
        debounce_s=debounce_s,
        **kw,
    )


@dataclass
class Cluster:
    """Emulators and the service replicating between them."""

    emus: list[Emulator]
    service: SyncService
    #: Emulators whose clock the test drives (their pushes flush only on advance).
    manual_clocks: dict[str, ManualClock] = field(default_factory=dict)
    #: Proxies that can hold a server's websocket frames, by server name.
    gates: dict[str, SocketGate] = field(default_factory=dict)
    #: Leaf item ids shared by every emulator; the last few are kept for sentinels.
    items: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.items = [item.id for item in self.emus[0].leaf_items()]
        self._sentinel_round = 0

    @property
    def free_items(self) -> list[str]:
        """Items tests may change (the sentinels are left out)."""
        return self.items[: -len(self.emus)]

    def emu(self, name: str) -> Emulator:
        """The emulator called ``name``."""
        return next(e for e in self.emus if e.server_name == name)

    def uid(self, emu: Emulator, user: str = USER) -> str:
        """The user's id on that emulator."""
        return emu.user_id(user)

    def data(self, emu: Emulator, item: str, user: str = USER) -> UserData:
        """What ``emu`` holds for the user and item."""
        return emu.user_data(emu.user_id(user), item)

    def change(self, emu: Emulator, item: str, user: str = USER, **kw: Any) -> UserData:
        """Change the user's data on ``emu`` as a user of that server would."""
        return emu.save_user_data(emu.user_id(user), item, **kw)

    def all_hold(self, item: str, expected: UserData, user: str = USER) -> bool:
        """Tell whether every emulator holds ``expected``."""
        return all(self.data(e, item, user) == expected for e in self.emus)

    def agree(self, items: Iterable[str], user: str = USER) -> bool:
        """Tell whether every emulator holds the same data for every item."""
        first = self.emus[0]
        return all(
            self.data(e, i, user) == self.data(first, i, user) for i in items for e in self.emus[1:]
        )

    async def wait_all_hold(self, item: str, expected: UserData, user: str = USER) -> None:
        """Wait until every emulator holds ``expected`` for ``item`` and the echoes are back.

        Waiting for the echoes too keeps the next user action out of the echo window: a user
        who restores, inside one debounce window, exactly the state jfsync just overwrote is
        indistinguishable from a stale event (see :mod:`jfsync.sync.echo`), and no test wants that.
        """
        await self.service.wait_for(lambda: self.all_hold(item, expected, user), WAIT_S)
        await self.wait_quiet([item], user)

    async def wait_items(
        self,
        emus: Sequence[Emulator],
        items: Sequence[str],
        expected: UserData,
        user: str = USER,
        timeout_s: float = WAIT_S,
    ) -> None:
        """Wait until every emulator in ``emus`` holds ``expected`` for every item.

        Cheap enough to re-check after every write of a large burst: items already seen to
        hold it are not looked at again until the end, where everything is checked once more.
        """
        pending = [(e, i) for e in emus for i in items]

        def done() -> bool:
            while pending:
                emu, item = pending[-1]
                if self.data(emu, item, user) != expected:
                    return False
                pending.pop()
            if all(self.data(e, i, user) == expected for e in emus for i in items):
                return True
            pending.extend((e, i) for e in emus for i in items)
            return False

        await self.service.wait_for(done, timeout_s)

    async def key(self, server: str, item: str) -> str:
        """The canonical key jfsync gives ``server``'s item ``item`` (usually the id itself;
        ``<server>:<id>`` when the plain id was taken while the libraries were indexed)."""
        found = await self.service.identity.canonical_items(server, [item])
        return found.get(item, item)

    async def pending(self, server: str, item: str, user: str = USER) -> tuple[Any, ...]:
        """jfsync's writes to ``server`` for ``item`` whose echo it still awaits."""
        key = await self.key(server, item)
        return await self.service.ledger.pending_echoes(server, f"name:{user}", key)

    async def is_quiet(self, items: Iterable[str], user: str = USER) -> bool:
        """Nothing queued or in flight, no echo pending for ``items``, no push armed."""
        ledger = self.service.ledger
        wanted = list(items)
        for link in self.service.links.values():
            if link.pusher.in_flight or await ledger.outbox_depth(link.name):
                return False
            for item in wanted:
                if await self.pending(link.name, item, user):
                    return False
        return not any(e.pushes_pending for e in self.emus)

    async def wait_quiet(self, items: Iterable[str], user: str = USER) -> None:
        """Wait until :meth:`is_quiet` holds."""
        wanted = list(items)
        await self.service.wait_for(lambda: self.is_quiet(wanted, user), WAIT_S)

    async def wait_connected(self, users: int = 2) -> None:
        """Wait until every user of every server has its live socket (resync done)."""

        def ready() -> bool:
            return all(
                len(link.subscribers) == users
                and all(str(s.status.state) == "connected" for s in link.subscribers.values())
                for link in self.service.links.values()
            )

        await self.service.wait_for(ready, WAIT_S)

    def writes(self, emu: Emulator, items: Iterable[str] | None = None) -> list[WriteRecord]:
        """Successful user-data writes ``emu`` received, optionally only for ``items``."""
        wanted = None if items is None else set(items)
        return [w for w in emu.writes if w.status < 300 and (wanted is None or w.item_id in wanted)]

    async def settle(self, user: str = USER) -> None:
        """Wait until everything sent so far was applied and every write it caused was made.

        One sentinel change per server goes through that server's socket after everything
        else; once every server holds every sentinel and no echo of jfsync's writes is still
        expected, every earlier message has been applied (messages of one socket are applied
        in order) and nothing is queued or in flight.
        """
        self._sentinel_round += 1
        sentinels = self.items[-len(self.emus) :]
        expected: dict[str, UserData] = {}
        for emu, item in zip(self.emus, sentinels, strict=True):
            expected[item] = self.change(emu, item, user, play_count=self._sentinel_round)
        if self.manual_clocks:
            # Those emulators flush only when told: first the sentinels, then the echoes.
            await self.flush_manual()
            await self.service.wait_for(
                lambda: all(self.all_hold(i, s, user) for i, s in expected.items()), WAIT_S
            )
            await self.flush_manual()

        async def quiet() -> bool:
            if not all(self.all_hold(i, s, user) for i, s in expected.items()):
                return False
            return await self.is_quiet(expected, user)

        await self.service.wait_for(quiet, WAIT_S)

    async def flush_manual(self) -> None:
        """Let every emulator on a ManualClock flush its armed UserDataChanged push."""
        for name, clock in self.manual_clocks.items():
            await clock.advance(self.emu(name).hub.debounce_s)


class UserClient:
    """A Jellyfin client acting as one user over HTTP (favourites, playback), not as jfsync."""

    def __init__(self, session: aiohttp.ClientSession, emu: Emulator, user: str = USER) -> None:
        self.session = session
        self.emu = emu
        self.user_id = emu.user_id(user)
        device = f"player-{emu.server_name}-{user}"
        token = emu.user_token(user, client="pytest-player", device_id=device)
        self.headers = {
            "Authorization": 'MediaBrowser Client="pytest-player", Device="pytest", '
            f'DeviceId="{device}", Version="1.0", Token="{token}"'
        }

    async def call(self, method: str, path: str, body: Any = None) -> int:
        """Send one request as the user and return the status."""
        async with self.session.request(
            method, self.emu.url + path, headers=self.headers, json=body
        ) as response:
            await response.read()
            return response.status

    async def favorite(self, item: str, on: bool) -> None:
        """Mark or unmark a favourite, as the web client does."""
        status = await self.call("POST" if on else "DELETE", f"/UserFavoriteItems/{item}")
        assert status == 200, status

    async def play_and_stop(self, item: str, position_ticks: int) -> None:
        """Start playback, then stop at ``position_ticks``, as a player reports it."""
        assert await self.call("POST", "/Sessions/Playing", {"ItemId": item}) == 204
        stopped = {"ItemId": item, "PositionTicks": position_ticks}
        assert await self.call("POST", "/Sessions/Playing/Stopped", stopped) == 204


class RequestSignal:
    """Wake waiters whenever any emulator answers an HTTP request (for out-of-process jfsync).

    Emulator state only changes through requests (or the test's own calls), so re-checking a
    predicate after every request is waiting on events, not on time.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def __enter__(self) -> RequestSignal:
        emulator_module.request_observers.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        emulator_module.request_observers.remove(self._observe)

    def _observe(self, emu: Emulator, record: RequestRecord) -> None:
        self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        """Wait until ``predicate`` holds, re-checking after every request."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


class SocketGate:
    """A loopback TCP proxy in front of an emulator that can hold its websocket frames.

    Plain HTTP passes straight through. On connections that ask for a websocket upgrade,
    bytes from the server to jfsync go through a gate: while it is held they queue in order,
    and :meth:`release` delivers them. That reproduces an event that is flushed by the server
    at one moment and reaches jfsync later, after jfsync wrote again. :meth:`hold_http` does
    the same to HTTP answers (an answer built before a user's action, read after its event).

    While the server behind it refuses connections (stopped) and :attr:`down_answer` is set,
    the gate answers every request itself with that status and body, as a reverse proxy in
    front of a stopped server does (502 from nginx, 404 from traefik once the container is
    gone, or a maintenance page); otherwise it closes the connection.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: (status, body) answered while the server behind refuses connections.
        self.down_answer: tuple[int, str] | None = None
        #: The request lines answered with ``down_answer`` (e.g. ``GET /System/Info/Public``).
        self.down_answered: list[str] = []
        self._answered = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()
        self._http_open = asyncio.Event()
        self._http_open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and cut every proxied connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def hold(self) -> None:
        """Queue websocket frames to jfsync from now on."""
        self._open.clear()

    def release(self) -> None:
        """Deliver the queued frames, in order, and stop holding."""
        self._open.set()

    def hold_http(self) -> None:
        """Queue HTTP answers to jfsync from now on (websocket frames are not affected)."""
        self._http_open.clear()

    def release_http(self) -> None:
        """Deliver the queued HTTP answers, in order, and stop holding them."""
        self._http_open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            if self.down_answer is not None:
                await self._answer_down(reader, writer, *self.down_answer)
            writer.close()
            return
        self._writers.append(up_writer)
        first = await reader.read(65536)
        gated = b"upgrade: websocket" in first.lower()
        up_writer.write(first)
        n = len(self._tasks)
        for coro, name in (
            (self._pump(reader, up_writer, gated=False), f"gate-up-{n}"),
            (self._pump(up_reader, writer, gated=gated, http=not gated), f"gate-down-{n}"),
        ):
            task = asyncio.get_running_loop().create_task(coro, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait_down_answered(self, path: str, count: int, timeout_s: float = WAIT_S) -> None:
        """Wait until ``count`` requests for ``path`` were answered with ``down_answer``."""
        async with asyncio.timeout(timeout_s):
            while sum(line.split(" ")[1:2] == [path] for line in self.down_answered) < count:
                self._answered.clear()
                await self._answered.wait()

    async def _answer_down(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: str
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        payload = body.encode()
        reason = {200: "OK", 404: "Not Found", 502: "Bad Gateway"}.get(status, "Status")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        try:
            await writer.drain()
        except ConnectionError:
            return
        # Only the request line: method and path (the query could carry anything).
        method, _, rest = line.partition(" ")
        self.down_answered.append(f"{method} {rest.split(' ')[0].split('?')[0]}")
        self._answered.set()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        gated: bool,
        http: bool = False,
    ) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if gated:
                    await self._open.wait()
                if http:
                    await self._http_open.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
