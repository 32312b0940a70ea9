"""``jfsync demo``: two emulated Jellyfin servers, the replicator between them, and users acting.

The demo starts two emulators ("home" and "cabin") with the same seeded library and the users
alice and bob, runs the real :class:`SyncService` against them with a temporary ledger, then
acts like the users on both sides: a favourite, a film watched to the end through the playback
routes, a rating, an unplay, a burst of 100 episodes marked played, and the cabin server going
down while changes keep coming and then returning. Each step prints the writes it caused on the
other server and how long they took; the end compares every item of every user on both servers
and prints the status summary. ``--once`` exits 0 only if everything converged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from jfsync.config import parse_config
from jfsync.emulator import Emulator
from jfsync.jellyfin.api import auth_header
from jfsync.logs import configure_logging
from jfsync.service import SyncService
from jfsync.sync.subscriber import SubscriberState

#: How long one step may take to show up on the other server.
STEP_TIMEOUT_S = 30.0
USERS = [("alice", "alice-demo-password"), ("bob", "bob-demo-password")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options."""
    parser.add_argument(
        "--once", action="store_true", help="run the script once and exit 0 only if it converged"
    )
    parser.add_argument("--library-size", type=int, default=400, help="items per server")
    parser.add_argument(
        "--debounce", type=float, default=0.5, help="emulated UserDataChanged debounce (s)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; return 0 when every step converged."""
    configure_logging("warning")
    try:
        return asyncio.run(_demo(args.library_size, args.debounce, keep_running=not args.once))
    except KeyboardInterrupt:
        return 0


class _Step:
    """Print a step and what it caused on the other side."""

    def __init__(self, servers: dict[str, Emulator]) -> None:
        self.servers = servers
        self.failed: list[str] = []

    async def run(
        self,
        title: str,
        action: Callable[[], Awaitable[None]],
        done: Callable[[], bool],
        service: SyncService,
    ) -> None:
        seen = {name: len(emu.writes) for name, emu in self.servers.items()}
        _say(f"\n▶ {title}")
        started = time.perf_counter()
        await action()
        try:
            await service.wait_for(done, STEP_TIMEOUT_S)
        except TimeoutError:
            self.failed.append(title)
            _say(f"  ✗ not converged after {STEP_TIMEOUT_S:.0f} s")
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        for name, emu in self.servers.items():
            new = emu.writes[seen[name] :]
            for write in new[:3]:
                body = "" if write.body is None else " " + _short(write.body)
                _say(f"  → {name}: {write.method} {write.route}{body}")
            if len(new) > 3:
                _say(f"  → {name}: … and {len(new) - 3} more writes")
        _say(f"  ✓ converged in {elapsed_ms:.0f} ms")


async def _demo(library_size: int, debounce_s: float, *, keep_running: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="jfsync-demo-") as tmp:
        home = Emulator(
            api_key="home-demo-key",
            users=USERS,
            library_size=library_size,
            seed=7,
            server_name="home",
            debounce_s=debounce_s,
        )
        cabin = Emulator(
            api_key="cabin-demo-key",
            users=USERS,
            library_size=library_size,
            seed=7,
            server_name="cabin",
            debounce_s=debounce_s,
        )
        async with home, cabin, aiohttp.ClientSession() as http:
            config = parse_config(
                f"ledger: {Path(tmp) / 'jfsync.db'}\n"
                "servers:\n"
                f"  - {{name: home, url: '{home.url}', api_key: home-demo-key}}\n"
                f"  - {{name: cabin, url: '{cabin.url}', api_key: cabin-demo-key}}\n"
            )
            _say(f"home  (Jellyfin {home.version}) at {home.url}")
            _say(f"cabin (Jellyfin {cabin.version}) at {cabin.url}")
            _say(f"library: {len(home.leaf_items())} films and episodes each; users alice, bob")
            service = SyncService(config)
            await service.start()
            try:
                await _wait_connected(service)
                _say("jfsync: every user's socket is connected on both servers")
                failed = await _script(service, home, cabin, http)
                converged = _compare(home, cabin)
                await _summary(service)
                if keep_running and not failed:
                    _say("\nStill running: change things on either server; Ctrl-C to stop.")
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.Event().wait()
            finally:
                await service.stop()
    if failed or not converged:
        _say(f"\nDEMO FAILED: {', '.join(failed) or 'servers differ at the end'}")
        return 1
    _say("\nDemo passed: both servers hold identical user data.")
    return 0


async def _wait_connected(service: SyncService) -> None:
    def connected() -> bool:
        subs = [s for link in service.links.values() for s in link.subscribers.values()]
        return len(subs) == 4 and all(s.state is SubscriberState.CONNECTED for s in subs)

    await service.wait_for(connected, STEP_TIMEOUT_S)


async def _script(
    service: SyncService, home: Emulator, cabin: Emulator, http: aiohttp.ClientSession
) -> list[str]:
    step = _Step({"home": home, "cabin": cabin})
    movies = [i for i in home.leaf_items() if i.type == "Movie"]
    episodes = [i for i in home.leaf_items() if i.type == "Episode"]
    a_home, a_cabin = home.user_id("alice"), cabin.user_id("alice")
    b_home, b_cabin = home.user_id("bob"), cabin.user_id("bob")
    film, watched, rated = movies[0], movies[1], movies[2]

    async def favourite() -> None:
        home.save_user_data(a_home, film.id, "UpdateUserRating", is_favorite=True)

    await step.run(
        f"alice favourites '{film.name}' on home",
        favourite,
        lambda: cabin.user_data(a_cabin, film.id).favorite,
        service,
    )

    async def watch() -> None:
        token = cabin.user_token("bob", client="Jellyfin Web", device_id="bob-tv")
        headers = {"Authorization": auth_header("bob-tv", token)}
        body = {"ItemId": watched.id, "PositionTicks": 0}
        async with http.post(f"{cabin.url}/Sessions/Playing", json=body, headers=headers):
            pass
        body = {"ItemId": watched.id, "PositionTicks": watched.run_time_ticks or 0}
        async with http.post(f"{cabin.url}/Sessions/Playing/Stopped", json=body, headers=headers):
            pass

    await step.run(
        f"bob watches '{watched.name}' to the end on cabin (playback start and stop)",
        watch,
        lambda: (
            home.user_data(b_home, watched.id) == cabin.user_data(b_cabin, watched.id)
            and home.user_data(b_home, watched.id).play_state.played
        ),
        service,
    )

    async def rate() -> None:
        home.save_user_data(a_home, rated.id, "UpdateUserRating", rating=8.0)

    await step.run(
        f"alice rates '{rated.name}' 8/10 on home",
        rate,
        lambda: cabin.user_data(a_cabin, rated.id).rating == 8.0,
        service,
    )

    async def unplay() -> None:
        cabin.save_user_data(
            b_cabin,
            watched.id,
            "TogglePlayed",
            played=False,
            play_count=0,
            position_ticks=0,
            clear_last_played=True,
        )

    await step.run(
        f"bob marks '{watched.name}' unplayed on cabin",
        unplay,
        lambda: (
            not home.user_data(b_home, watched.id).play_state.played
            and home.user_data(b_home, watched.id).play_state.last_played_s is None
        ),
        service,
    )

    burst = episodes[:100]

    async def binge() -> None:
        for episode in burst:
            home.save_user_data(a_home, episode.id, "TogglePlayed", played=True, play_count=1)

    await step.run(
        f"alice marks {len(burst)} episodes played on home",
        binge,
        lambda: all(cabin.user_data(a_cabin, e.id).play_state.played for e in burst),
        service,
    )

    await cabin.stop_listener()
    _say("\n▶ cabin goes down")
    offline = movies[3:8]
    for movie in offline:
        home.save_user_data(a_home, movie.id, "UpdateUserRating", is_favorite=True)
    home.save_user_data(b_home, movies[8].id, "UpdateUserRating", rating=3.0)

    async def queued() -> bool:
        return await service.ledger.outbox_depth("cabin") >= len(offline) + 1

    try:
        await service.wait_for(queued, STEP_TIMEOUT_S)
        depth = await service.ledger.outbox_depth("cabin")
        _say(f"  … alice favourites {len(offline)} films and bob rates one on home meanwhile")
        _say(f"  … {depth} changes queued for cabin in the ledger")
    except TimeoutError:
        step.failed.append("queue while cabin is down")

    async def come_back() -> None:
        await cabin.start_listener()

    await step.run(
        "cabin comes back",
        come_back,
        lambda: (
            all(cabin.user_data(a_cabin, m.id).favorite for m in offline)
            and cabin.user_data(b_cabin, movies[8].id).rating == 3.0
        ),
        service,
    )
    return step.failed


def _compare(home: Emulator, cabin: Emulator) -> bool:
    differ = 0
    items = home.leaf_items()
    for name, _ in USERS:
        uh, uc = home.user_id(name), cabin.user_id(name)
        differ += sum(home.user_data(uh, i.id) != cabin.user_data(uc, i.id) for i in items)
    checked = len(items) * len(USERS)
    if differ:
        _say(f"\n✗ {differ} of {checked} (user, item) pairs differ between home and cabin")
        return False
    _say(f"\n✓ all {checked} (user, item) pairs are identical on home and cabin")
    return True


async def _summary(service: SyncService) -> None:
    status = await service.status()
    counters = status["counters"]
    _say(
        f"jfsync: {counters['events_received']} events, {counters['changes_applied']} changes, "
        f"{counters['echoes']} echoes of its own writes recognised and ignored"
    )
    for server in status["servers"]:
        out = server["outbox"]
        _say(
            f"  {server['name']}: {out['writes_done']} writes received, queue {out['depth']}, "
            f"dead rows {len(out['dead'])}, sockets "
            + ", ".join(f"{u['user']}={u['state']}" for u in server["users"])
        )


def _short(body: dict[str, object]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in body.items())
    return "{" + (text if len(text) < 90 else text[:87] + "...") + "}"


def _say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jfsync demo")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
