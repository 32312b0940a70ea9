"""Benchmark identity and reconcile: catch-up after a reconnect, and a first full reconcile.

Each emulated server runs in a process of its own (``serve`` below), so the figures of the
measuring process are jfsync's alone (its peak RSS excludes the emulators).

* ``catchup``: two servers of 100,000 items (same layout), one user with non-default data on
  2% of the items (2,000) on both. After the index is built and the first catch-up brought the
  ledger in line, 20 items change on server a while "disconnected"; then the reconnect
  catch-up (five filtered listings of non-default items, diff, apply) is timed, three times,
  against a full scan of the whole library for the same user (every item with its user data,
  and the same diff), in the same run.
* ``reconcile``: two servers (three with ``--servers 3``) of 100,000 items under different
  path roots (ids all differ; items match by rewritten path), five users, 5% of the items
  differing per user between the servers (a third only on a, a third only on b, a third on
  both with different play states; c, if any, plays like b), no ledger yet. Times the first
  real reconcile (index every library, match, read every user on every server, merge, write
  every difference) with the process's peak RSS, then a dry run on the reconciled servers
  (which must find nothing to do).

Issue 13's figures, measured in the same run: the worst event-loop stall (``looplag.py``) during
the index build, the catch-ups, the reconcile (also per phase of it: the scans, the match, the
catch-ups and the delivery, told apart by jfsync's own log lines) and a refresh; the bytes this
process wrote to disk (``/proc/self/io``) during the index build, its scans alone (into the index
file) and with the first match (which writes the id maps into the ledger), in ``reconcile`` per
phase of it (the same phases as the stalls), next to the size on disk
of what jfsync keeps (``ledger_mib``: the ledger and its index file ``<ledger>.index``, each with
its write-ahead log; ``index_file_mib``: the index file alone); in ``catchup``, the one-item
refresh of goal 5 (one item of a moved: its ``LibraryChanged``, old id removed and new id added,
re-read and matched again through ``IndexedIdentity.library_changed``), then a rescan of a with
nothing else changed (its time, bytes written and loop stall; both report whether they fell back to
matching everything again); and in ``reconcile``, the floor: a bare aiohttp client listing both
libraries with every user's data (every item, pages of 1,000, what a scan asks for) plus a bare
write loop making the same writes as the reconcile (same route and body, at the pusher's
concurrency), run on the reconciled servers right after it.

    .venv/bin/python bench/bench_identity.py                  # both scenarios
    .venv/bin/python bench/bench_identity.py catchup --items 100000
    .venv/bin/python bench/bench_identity.py reconcile --items 100000 --users 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from looplag import INTERVAL_S, LoopLag, write_bytes  # noqa: E402
from results import emit  # noqa: E402

from jfsync.config import Config  # noqa: E402
from jfsync.emulator import Emulator  # noqa: E402
from jfsync.jellyfin.api import JellyfinClient  # noqa: E402
from jfsync.jellyfin.wire import update_body  # noqa: E402
from jfsync.ops.reconcilecmd import PlannedWrite, run_reconcile  # noqa: E402
from jfsync.ops.runcmd import tune_garbage_collector  # noqa: E402
from jfsync.sync.catchup import catchup_observations  # noqa: E402
from jfsync.sync.delivery import CONCURRENCY  # noqa: E402
from jfsync.sync.identity import IndexedIdentity  # noqa: E402
from jfsync.sync.index import index_path  # noqa: E402
from jfsync.sync.ledger import Ledger  # noqa: E402
from jfsync.sync.merge import MergePolicy  # noqa: E402
from jfsync.sync.reconcile import Reconciler  # noqa: E402
from jfsync.timing import SystemClock  # noqa: E402

API_KEY = "0123456789abcdef0123456789abcdef"
OLD = datetime(2024, 1, 1, 12, tzinfo=UTC)
NEW = datetime(2025, 1, 1, 12, tzinfo=UTC)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- emulator processes


def seed_catchup(emu: Emulator, share: float) -> None:
    """alice: non-default data on ``share`` of the items (the same on every server)."""
    user = emu.user_id("alice")
    leaves = emu.leaf_items()
    rng = random.Random(7)
    for n, item in enumerate(rng.sample(leaves, int(len(leaves) * share))):
        kind = n % 4
        if kind == 0:
            kw: dict[str, Any] = {"played": True, "play_count": 1, "last_played": OLD}
        elif kind == 1:
            kw = {"is_favorite": True}
        elif kind == 2:
            kw = {"position_ticks": 6_000_000_000 + n}
        else:
            kw = {"rating": float(1 + n % 10)}
        emu.save_user_data(user, item.id, "PlaybackProgress", **kw)


def seed_reconcile(emu: Emulator, name: str, users: list[str], share: float) -> None:
    """Per user, ``share`` of the items differ: a only, b only, or different play states."""
    leaves = emu.leaf_items()
    for u, user in enumerate(users):
        uid = emu.user_id(user)
        rng = random.Random(100 + u)
        for n, item in enumerate(rng.sample(leaves, int(len(leaves) * share))):
            kind = n % 3
            kw: dict[str, Any] | None = None
            if kind == 0 and name == "a":
                kw = {"played": True, "play_count": 1, "last_played": OLD}
            elif kind == 1 and name == "b":
                kw = {"is_favorite": True, "rating": 8.0}
            elif kind == 2:
                kw = (
                    {"played": True, "play_count": 1, "last_played": OLD}
                    if name == "a"
                    else {"played": True, "play_count": 2, "last_played": NEW}
                )
            if kw is not None:
                emu.save_user_data(uid, item.id, "PlaybackProgress", **kw)


async def serve(args: argparse.Namespace) -> None:
    """Build one emulator, seed it, print its URL as JSON, serve until stdin closes."""
    users = [f"user{n}" for n in range(args.users)] if args.scenario == "reconcile" else ["alice"]
    started = time.perf_counter()
    emu = Emulator(
        api_key=API_KEY,
        users=[(u, "pw") for u in users],
        library_size=args.items,
        seed=1,
        server_name=args.name,
        path_root=args.root,
        provider_ids=not args.no_provider_ids,
        debounce_s=0.5,
    )
    if args.scenario == "catchup":
        seed_catchup(emu, args.share)
    else:
        seed_reconcile(emu, args.name, users, args.share)
    await emu.start()
    print(
        json.dumps(
            {
                "url": emu.url,
                "users": {u: emu.user_id(u) for u in users},
                "items": [i.id for i in emu.leaf_items()] if args.scenario == "catchup" else [],
                "build_s": time.perf_counter() - started,
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await loop.run_in_executor(None, sys.stdin.read)
    await emu.close()


class Servers:
    """Emulator child processes."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.info: dict[str, dict[str, Any]] = {}

    def start(
        self, scenario: str, items: int, users: int, share: float, roots: dict[str, str]
    ) -> None:
        """Start one emulator process per root and read where each listens."""
        for name, root in roots.items():
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "serve",
                    "--scenario",
                    scenario,
                    "--name",
                    name,
                    "--root",
                    root,
                    "--items",
                    str(items),
                    "--users",
                    str(users),
                    "--share",
                    str(share),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs.append(proc)
        for name, proc in zip(roots, self.procs, strict=True):
            assert proc.stdout is not None
            self.info[name] = json.loads(proc.stdout.readline())

    def stop(self) -> None:
        """Close the emulators' stdin (they exit) and wait for them."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=30)


def make_config(servers: Servers, ledger: Path, rewrites: dict[str, str] | None = None) -> Config:
    """A config for the running emulators (``rewrites``: server -> path root to map)."""
    return Config.model_validate(
        {
            "ledger": str(ledger),
            "servers": [
                {
                    "name": name,
                    "url": info["url"],
                    "api_key": API_KEY,
                    "timeout_s": 60,
                    "path_rewrites": (
                        [{"from": rewrites[name], "to": "/media"}] if rewrites else []
                    ),
                }
                for name, info in servers.info.items()
            ],
        }
    )


# ---------------------------------------------------------------------- scenarios


async def catchup_scenario(items: int, share: float, rounds: int) -> dict[str, Any]:
    """Time reconnect catch-ups against full scans of the library."""
    servers = Servers()
    servers.start("catchup", items, 1, share, {"a": "/media", "b": "/media"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return await _catchup(servers, Path(tmp), share, rounds)
    finally:
        servers.stop()


async def _catchup(servers: Servers, tmp: Path, share: float, rounds: int) -> dict[str, Any]:
    config = make_config(servers, tmp / "ledger.db")
    clock = SystemClock()
    result: dict[str, Any] = {"items": len(servers.info["a"]["items"]), "share": share}
    async with (
        Ledger(config.ledger, MergePolicy.from_config(config)) as ledger,
        aiohttp.ClientSession() as session,
    ):
        clients = {
            name: JellyfinClient(
                name, info["url"], API_KEY, session=session, device_id=f"bench-{name}", timeout_s=60
            )
            for name, info in servers.info.items()
        }
        users = {
            name: {info["users"]["alice"]: "name:alice"} for name, info in servers.info.items()
        }
        for name, info in servers.info.items():
            await ledger.map_user(name, info["users"]["alice"], "name:alice")
        identity = IndexedIdentity(config, ledger, clock)
        await identity.start(clients)
        reconciler = Reconciler(ledger, identity, clients, clock, users=lambda: users)
        probe = LoopLag().start()
        try:
            written = write_bytes()
            started = time.perf_counter()
            # The scans end where the first match begins: mark the bytes written once the last
            # one (which makes the index file's indexes) returned.
            scanned: dict[str, float] = {}
            index = identity.index
            scan = index.scan

            async def marked(*args: Any, **kwargs: Any) -> Any:
                found = await scan(*args, **kwargs)
                scanned["done"] = scanned.get("done", 0) + 1
                if scanned["done"] == len(servers.info):
                    scanned["bytes"] = write_bytes()
                    scanned["at"] = time.perf_counter()
                return found

            index.scan = marked  # type: ignore[method-assign]
            await identity.refresh()
            index.scan = scan  # type: ignore[method-assign]
            result["index_both_s"] = time.perf_counter() - started
            result["index_written_mib"] = (write_bytes() - written) / 2**20
            result["index_scan_s"] = scanned["at"] - started
            result["index_scan_written_mib"] = (scanned["bytes"] - written) / 2**20
            result["index_file_mib"] = file_mib(index_path(config.ledger))
            result["index_stall_ms"] = probe.worst_ms
            probe.reset()
            result["ledger_after_index_mib"] = ledger_mib(config.ledger)
            started = time.perf_counter()
            first = [
                await reconciler.catch_up(n, next(iter(u)), "name:alice") for n, u in users.items()
            ]
            result["first_catchup_both_s"] = time.perf_counter() - started
            result["non_default_items"] = first[0].scanned
            user_a = servers.info["a"]["users"]["alice"]
            ids = servers.info["a"]["items"]
            rng = random.Random(3)
            catchups: list[float] = []
            fulls: list[float] = []
            await asyncio.sleep(2 * INTERVAL_S)
            catchup_stall = probe.worst_ms  # the first catch-ups of both servers
            for round_ in range(rounds):
                # 20 items change on a while jfsync is not listening.
                async with session.post(
                    f"{servers.info['a']['url']}/__emulator__/flush"
                ) as response:
                    await response.read()
                for item in rng.sample(ids, 20):
                    body = {
                        "is_favorite": True,
                        "play_count": round_ + 5,
                        "reason": "PlaybackProgress",
                    }
                    async with session.post(
                        f"{servers.info['a']['url']}/__emulator__/user-data/{user_a}/{item}",
                        json=body,
                    ) as response:
                        assert response.status == 200, response.status
                probe.reset()
                started = time.perf_counter()
                found = await reconciler.catch_up("a", user_a, "name:alice")
                catchups.append(time.perf_counter() - started)
                # Let the probe wake once more, then keep the worst stall of the catch-up
                # alone: the floor's full scan below runs in this loop too and is not jfsync's.
                await asyncio.sleep(2 * INTERVAL_S)
                catchup_stall = max(catchup_stall, probe.worst_ms)
                assert found.changed == 20, found
                started = time.perf_counter()
                await full_scan(clients["a"], identity, ledger, user_a)
                fulls.append(time.perf_counter() - started)
            result["catchup_s"] = catchups
            result["full_scan_s"] = fulls
            result["ratio"] = statistics.median(catchups) / statistics.median(fulls)
            result["catchup_stall_ms"] = catchup_stall
            # One item of a moves (a new id, as Jellyfin gives a moved file): its LibraryChanged
            # (old id removed, new id added) re-reads that item and matches again.
            moved = ids[len(ids) // 2]
            async with session.post(
                f"{servers.info['a']['url']}/__emulator__/items/{moved}/move",
                params={"path": "/media/bench-moved/moved-item.mkv"},
            ) as response:
                assert response.status == 200, response.status
                new_id = str((await response.json())["id"])
            probe.reset()
            full = identity.full_matches
            started = time.perf_counter()
            await identity.library_changed("a", {new_id}, {moved})
            result["one_item_refresh_s"] = time.perf_counter() - started
            result["one_item_refresh_full_match"] = identity.full_matches > full
            result["refresh_stall_ms"] = probe.worst_ms
            probe.reset()
            # Then a rescan of a (nothing changed since): what it writes and how long it takes.
            written = write_bytes()
            started = time.perf_counter()
            await identity.refresh(["a"])
            result["rescan_s"] = time.perf_counter() - started
            result["rescan_written_mib"] = (write_bytes() - written) / 2**20
            result["rescan_full_match"] = identity.full_matches > full
            result["rescan_stall_ms"] = probe.worst_ms
        finally:
            await probe.stop()
            await identity.close()
    result["peak_rss_mib"] = peak_rss_mib()
    result["ledger_mib"] = ledger_mib(config.ledger)
    return result


def file_mib(path: str | Path) -> float:
    """The size on disk of an SQLite file and its write-ahead log, in MiB."""
    total = 0
    for file in (Path(path), Path(f"{path}-wal")):
        if file.exists():
            total += file.stat().st_size
    return total / 2**20


def ledger_mib(path: Path) -> float:
    """What jfsync keeps on disk, in MiB: the ledger and its library index file
    (``<ledger>.index``), each with its write-ahead log."""
    return file_mib(path) + file_mib(index_path(path))


async def reconcile_floor(servers: Servers, writes: list[PlannedWrite]) -> dict[str, float]:
    """A bare client's listing of both libraries for every user, then the same writes."""
    header = (
        'MediaBrowser Client="floor", Device="bench", DeviceId="bench-floor", '
        f'Version="1", Token="{API_KEY}"'
    )
    headers = {"Authorization": header, "Accept": "application/json"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        started = time.perf_counter()
        listed = 0
        for info in servers.info.values():
            for user_id in info["users"].values():
                start = 0
                while True:
                    params = {
                        "userId": user_id,
                        "Recursive": "true",
                        "IncludeItemTypes": "Movie,Episode",
                        "Fields": "Path,ProviderIds",
                        "EnableUserData": "true",
                        "EnableImages": "false",
                        "SortBy": "SortName",
                        "StartIndex": str(start),
                        "Limit": "1000",
                    }
                    async with session.get(info["url"] + "/Items", params=params) as response:
                        assert response.status == 200, response.status
                        page = (await response.json())["Items"]
                    listed += len(page)
                    start += len(page)
                    if len(page) < 1000:
                        break
        list_s = time.perf_counter() - started
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(write: PlannedWrite) -> None:
            info = servers.info[write.server]
            user_id = info["users"][write.user.removeprefix("name:")]
            body = update_body(write.after, frozenset(write.registers))
            async with (
                gate,
                session.post(
                    f"{info['url']}/UserItems/{write.remote_item_id}/UserData",
                    params={"userId": user_id},
                    json=body,
                ) as response,
            ):
                await response.read()
                assert response.status == 200, response.status

        started = time.perf_counter()
        await asyncio.gather(*(one(w) for w in writes))
        write_s = time.perf_counter() - started
    return {"floor_list_s": list_s, "floor_write_s": write_s, "floor_listed": listed}


async def full_scan(
    client: JellyfinClient, identity: IndexedIdentity, ledger: Ledger, user_id: str
) -> int:
    """The alternative: list every item with the user's data, map it, diff it."""
    states = {}
    async for item in client.iter_items(user_id, fields=()):
        if item.user_data is not None:
            states[item.id] = item.user_data.to_user_data()
    mapped = await identity.canonical_items("a", list(states))
    by_key = {mapped[r]: s for r, s in states.items() if r in mapped}
    known = await ledger.last_known_for_user("a", "name:alice")
    differing = catchup_observations(
        "a",
        "name:alice",
        {k: s for k, s in by_key.items() if not s.is_default or k in known},
        known,
        0,
    )
    return len(differing)


#: The reconcile's phases, each ended by the first jfsync log line starting with one of these
#: (the last server's scan, the match, the catch-ups); delivery and the report run to the end.
RECONCILE_PHASES = (
    ("index", ("library index built",)),
    ("match", ("matched items of",)),
    ("catchups", ("full reconcile:",)),
    ("delivery", ()),
)


class PhaseMarks(logging.Handler):
    """Notes when jfsync logged the end of each phase of a reconcile (monotonic time), and
    collects the loop probe's stalls (``write`` takes its ``<time> <ms>`` lines)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ends: dict[str, float] = {}
        #: This process's bytes written (``/proc/self/io``) when each phase ended.
        self.written: dict[str, int] = {}
        self.stalls: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for phase, starts in RECONCILE_PHASES:
            if phase not in self.ends and any(text.startswith(s) for s in starts):
                self.ends[phase] = time.monotonic()
                self.written[phase] = write_bytes()

    def write(self, line: str) -> None:
        when, _, ms = line.partition(" ")
        self.stalls.append((float(when), float(ms)))

    def flush(self) -> None:
        """Nothing buffered."""

    def written_by_phase(self, start: int, end: int) -> dict[str, float]:
        """The bytes written (MiB) within each phase, in order (from ``start`` bytes to
        ``end`` bytes of ``write_bytes``)."""
        found: dict[str, float] = {}
        begin = start
        for phase, _ in RECONCILE_PHASES:
            until = self.written.get(phase, end) if phase != "delivery" else end
            found[phase] = max(0, until - begin) / 2**20
            begin = max(begin, until)
        return found

    def worst_by_phase(self, start: float, end: float) -> dict[str, float]:
        """The worst stall (ms) within each phase, in order."""
        worst: dict[str, float] = {}
        begin = start
        for phase, _ in RECONCILE_PHASES:
            until = self.ends.get(phase, end) if phase != "delivery" else end
            worst[phase] = max((ms for at, ms in self.stalls if begin <= at <= until), default=0.0)
            begin = max(begin, until)
        return worst


#: Path roots of the servers of the reconcile scenario, in order (``--servers`` takes the first N).
RECONCILE_ROOTS = {"a": "/mnt/a", "b": "/srv/b", "c": "/data/c"}


async def reconcile_scenario(
    items: int, users: int, share: float, count: int = 2
) -> dict[str, Any]:
    """Time a dry run and the first real reconcile of two unequal servers."""
    servers = Servers()
    roots = dict(list(RECONCILE_ROOTS.items())[:count])
    servers.start("reconcile", items, users, share, roots)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = make_config(servers, Path(tmp) / "ledger.db", rewrites=roots)
            result: dict[str, Any] = {
                "items": items,
                "users": users,
                "share": share,
                "servers": count,
            }
            result["peak_rss_start_mib"] = peak_rss_mib()
            written = write_bytes()
            # Where the worst stalls were: per phase, from jfsync's own log lines.
            marks = PhaseMarks()
            jfsync_log = logging.getLogger("jfsync")
            level = jfsync_log.level
            jfsync_log.addHandler(marks)
            jfsync_log.setLevel(logging.INFO)
            try:
                async with LoopLag(marks) as probe:  # type: ignore[arg-type]  # a writer
                    began = time.monotonic()
                    started = time.perf_counter()
                    real = await run_reconcile(config, dry_run=False)
                    result["reconcile_s"] = time.perf_counter() - started
                    ended = time.monotonic()
            finally:
                jfsync_log.removeHandler(marks)
                jfsync_log.setLevel(level)
            result["reconcile_stall_ms"] = probe.worst_ms
            result["reconcile_stall_by_phase_ms"] = marks.worst_by_phase(began, ended)
            done = write_bytes()
            result["reconcile_written_mib"] = (done - written) / 2**20
            # Per phase: the match (which writes the id maps) apart from the scans into the
            # index file and from the catch-ups' and the delivery's ledger writes.
            result["reconcile_written_by_phase_mib"] = marks.written_by_phase(written, done)
            result["peak_rss_mib"] = peak_rss_mib()
            result["writes"] = len(real.writes)
            result["failures"] = len(real.failures)
            pair = real.identity["pairs"][0]
            result["matched"] = pair["matched"]
            result["matched_by_rule"] = pair["matched_by_rule"]
            result["ledger_mib"] = ledger_mib(config.ledger)
            result["index_file_mib"] = file_mib(index_path(config.ledger))
            # Then what a dry run finds on the reconciled servers (nothing), and its time.
            started = time.perf_counter()
            # A second reconcile re-matches libraries whose id maps are all written: other
            # whole-library structures than the first's, so its loop stalls are probed too.
            async with LoopLag() as again_probe:
                again = await run_reconcile(config, dry_run=True)
            result["second_dry_run_s"] = time.perf_counter() - started
            result["second_dry_run_stall_ms"] = again_probe.worst_ms
            result["second_dry_run_writes"] = len(again.writes)
            result["ok"] = real.ok and again.ok and not again.writes
            result.update(await reconcile_floor(servers, real.writes))
            result["floor_s"] = result["floor_list_s"] + result["floor_write_s"]
            print(
                f"reconcile {result['reconcile_s']:.2f} s against a floor of "
                f"{result['floor_s']:.2f} s (bare listing {result['floor_list_s']:.2f} s of "
                f"{result['floor_listed']} items, bare writes {result['floor_write_s']:.2f} s of "
                f"{result['writes']}): {result['reconcile_s'] / result['floor_s']:.2f}x; "
                f"worst loop stall {result['reconcile_stall_ms']:.0f} ms ("
                + ", ".join(
                    f"{phase} {ms:.0f}"
                    for phase, ms in result["reconcile_stall_by_phase_ms"].items()
                )
                + f"); written {result['reconcile_written_mib']:.0f} MiB ("
                + ", ".join(
                    f"{phase} {mib:.0f}"
                    for phase, mib in result["reconcile_written_by_phase_mib"].items()
                )
                + f") for {result['ledger_mib']:.0f} MiB kept; a second reconcile (dry run) "
                f"{result['second_dry_run_s']:.1f} s, worst loop stall "
                f"{result['second_dry_run_stall_ms']:.0f} ms",
                flush=True,
            )
            return result
    finally:
        servers.stop()


# ---------------------------------------------------------------------- command line


def main() -> int:
    """Run the scenarios asked for; exit non-zero when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    for name in ("catchup", "reconcile", "all"):
        p = sub.add_parser(name)
        p.add_argument("--items", type=int, default=100_000)
        p.add_argument("--users", type=int, default=5)
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument(
            "--servers",
            type=int,
            choices=(2, 3),
            default=2,
            help="reconcile: servers (c, if any, has b's data of the third kind)",
        )
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--scenario", required=True)
    serve_p.add_argument("--name", required=True)
    serve_p.add_argument("--root", required=True)
    serve_p.add_argument("--items", type=int, required=True)
    serve_p.add_argument("--users", type=int, required=True)
    serve_p.add_argument("--share", type=float, required=True)
    serve_p.add_argument(
        "--no-provider-ids",
        action="store_true",
        help="items without provider ids (matching no other server's items but by path)",
    )
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args))
        return 0
    command = args.command or "all"
    items = getattr(args, "items", 100_000)
    if command == "all":
        # Each scenario in a fresh process, so each peak RSS is its own.
        for scenario in ("catchup", "reconcile"):
            code = subprocess.call([sys.executable, __file__, scenario, "--items", str(items)])
            if code:
                return code
        return 0
    if command == "catchup":
        tune_garbage_collector()  # the index build and catch-ups run in `jfsync run`, which does
        result = asyncio.run(catchup_scenario(items, 0.02, args.rounds))
        print(json.dumps({"catchup": result}, indent=1))
        emit("catchup", **result)
        ok = result["ratio"] <= 0.1
    else:
        tune_garbage_collector()  # as `jfsync reconcile` does
        result = asyncio.run(reconcile_scenario(items, args.users, 0.05, args.servers))
        print(json.dumps({"reconcile": result}, indent=1))
        emit("reconcile", **result)
        # The goal: within 1.5x of the floor the same run measured (not a fixed time).
        ok = result["ok"] and result["reconcile_s"] <= 1.5 * result["floor_s"]
    print(f"target {'met' if ok else 'MISSED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
