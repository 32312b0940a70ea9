"""Replication benchmarks: added latency, burst throughput against a bare-client floor, peak RSS.

``jfsync run`` runs as a subprocess (its own interpreter, as in production) against two
emulators in this process, ``a`` and ``b``, that share one library (identical item ids). A
third emulator, ``floor``, with the same library and no jfsync attached, receives the floor
run. Figures printed:

* **latency**: with the emulators' echo debounce at 0, ``--changes`` favourites made on ``a``
  at a steady ``--rate`` per second; for each, the time from the change on ``a`` to the
  matching write arriving at ``b`` (both read from the same monotonic clock: the change time
  here, the write record's time on ``b``). p50 / p95 / p99 / max.
* **burst**: ``--burst`` items marked played on ``a`` at once (one bulk action, like marking a
  season or a library played); the time until ``b`` has received every write, from the bulk
  action and from the moment ``a`` sent its ``UserDataChanged`` message of it (before that
  the time is ``a``'s own: saving the changes and building the message). Compared with
  the floor: the same writes (same route, same body) sent straight to ``floor`` by a bare
  aiohttp loop at the pusher's concurrency (:data:`jfsync.sync.delivery.CONCURRENCY`), in a
  process of its own as jfsync is (in here it would share one core and one event loop with
  the emulator it writes to). Printed with it: the CPU both clients used (jfsync's split into
  its event loop and its other threads, SQLite's), and how long the server received no write
  between the first and the last (gaps of 5 ms or more), for both. Beside it, a second floor
  on a fourth emulator, ``read-floor``: the same bare client making the pusher's compare
  reads too (each batch listed before it is written, one batch ahead), which every write of
  jfsync's needs (compare-before-write) and the plain floor leaves out. It has no goal; it
  says how much of the burst's gap to the floor is those reads' cost to the server.
* **rss**: peak resident memory of the ``jfsync run`` process (psutil, sampled every 20 ms)
  during the burst, and until ``b``'s echo of it (one debounced message of as many entries)
  has been applied.

The floor runs once jfsync is quiet again (the echo applied), so that work does not slow it;
with ``--repeat`` the floor runs after the burst in even repetitions and before it in odd ones.
The catch-up of ``c`` under way when the latency phase ends is waited for before the bursts.

``jfsync run`` runs under ``looplag.py``, a probe on its event loop: the worst loop stall is
printed for the start (first reconcile), the latency phase and each burst (and, for the
latency phase, this process's own, whose loop serves a and b). With ``--catchup-items N`` a
third server ``c`` of N items (20% of them with non-default data for ``alice``, an emulator
in a process of its own, none of its items matching a's or b's) joins the sync; the latency
phase starts once c is brought up (index scan, match, first catch-up), and during it c's
websocket is dropped again each time jfsync has finished catching up with it, 100 of c's
items changed each time (so each catch-up applies what changed while it was away). The goal
(issue 13, goal 3) is judged on the changes made during a catch-up: from c's first catch-up
listing (``filters=``) after the previous one ended to the end seen on jfsync's status; the
count of those changes and each catch-up's length are printed, and beside them the latency of
the changes made outside every catch-up in the same run (this shared machine's load moves both
alike; what a catch-up adds is the difference).

With ``--repeat N`` the burst runs N times in a row in the same ``jfsync run`` (each time a new
play date and count on the same items, after the last burst's echoes were applied), each with
its own floor run, and the median ratio is printed. The first burst finds items jfsync has no
history of on ``b`` (a first contact in every compare); the later ones find them known.

With ``--jfsync-path DIR`` the ``jfsync run`` under test is the package found in DIR (another
commit's, extracted with ``git archive``: ``bench_burst_ab.py`` runs the baseline's that way);
the emulators, the floors and the timing stay this checkout's.

Run from the repository root::

    .venv/bin/python bench/bench_replication.py            # --changes 2000 --rate 100 --burst 10000
    .venv/bin/python bench/bench_replication.py --changes 100 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from looplag import LoopLag, worst_between
from results import emit

from jfsync import emulator as emulator_module
from jfsync.emulator import Emulator, RequestRecord
from jfsync.jellyfin.api import IDS_PER_REQUEST, even_chunks
from jfsync.jellyfin.wire import update_body
from jfsync.model import PlayState, UserData
from jfsync.ops.runcmd import tune_garbage_collector
from jfsync.sync.delivery import BATCH_SIZE, CONCURRENCY

API_KEY = "0123456789abcdef0123456789abcdef"
#: Jellyfin's UserDataChanged debounce (fact sheet §2.1).
JELLYFIN_DEBOUNCE_S = 0.5
USER = "alice"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free loopback port for the status endpoint of the subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(emus: list[tuple[str, str]], ledger: Path, status_port: int) -> str:
    """A config for ``jfsync run`` syncing the given emulators (name, url)."""
    lines = [
        f"ledger: {ledger}",
        "logging:",
        "  level: warning",
        "status:",
        f"  listen: 127.0.0.1:{status_port}",
        "servers:",
    ]
    for name, url in emus:
        lines += [
            f"  - name: {name}",
            f"    url: {url}",
            f"    api_key: {API_KEY}",
            "    timeout_s: 120",
        ]
    return "\n".join(lines) + "\n"


class Writes:
    """Wakes a waiter when an emulator's requests may have made its predicate true."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        #: Wake only once this emulator has recorded this many writes (None: every request).
        self._until: tuple[Emulator, int] | None = None

    def observe(self, emu: Emulator, record: RequestRecord) -> None:
        """Request observer: wake the waiter (during a burst, only at the expected count:
        waking it on each of 10,000 writes would slow the server under test, and not the
        floor)."""
        until = self._until
        if until is None or len(until[0].writes) >= until[1]:
            self.changed.set()

    async def wait(
        self, predicate: object, timeout_s: float, *, until: tuple[Emulator, int] | None = None
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking after requests (see ``until``)."""
        assert callable(predicate)
        self._until = until
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        finally:
            self._until = None


async def floor_run(
    url: str, user_id: str, bodies: dict[str, dict[str, object]], *, reads: bool = False
) -> float:
    """Send the writes straight to the server at ``url`` at the pusher's concurrency, with a
    bare aiohttp loop; return the seconds taken.

    With ``reads``, the bare client also makes the pusher's compare reads: it takes the items
    in batches of :data:`~jfsync.sync.delivery.BATCH_SIZE`, lists each batch with the query
    the pusher sends (:data:`~jfsync.jellyfin.api.IDS_PER_REQUEST` ids a request, no fields,
    no images) and decodes the answer, one batch read ahead of the writes, as the pusher
    reads the next batch while one is written. Nothing is compared or recorded: it is what
    the reads cost the server and a client that does nothing else.
    """
    header = (
        'MediaBrowser Client="floor", Device="bench", DeviceId="bench-floor", '
        f'Version="1", Token="{API_KEY}"'
    )
    headers = {"Authorization": header, "Accept": "application/json"}
    gate = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:

        async def one(item: str, body: dict[str, object]) -> None:
            async with (
                gate,
                session.post(
                    f"{url}/UserItems/{item}/UserData",
                    params={"userId": user_id},
                    json=body,
                    headers=headers,
                ) as response,
            ):
                await response.read()
                assert response.status == 200, response.status

        async def read(items: list[str]) -> None:
            for chunk in even_chunks(items, IDS_PER_REQUEST):  # the pusher's requests
                params = {
                    "userId": user_id,
                    "recursive": "true",
                    "ids": ",".join(chunk),
                    "startIndex": "0",
                    "limit": str(len(chunk)),
                    "enableTotalRecordCount": "false",
                    "enableImages": "false",
                }
                async with session.get(f"{url}/Items", params=params, headers=headers) as got:
                    listed = json.loads(await got.read())
                    assert got.status == 200, got.status
                    assert len(listed["Items"]) == len(chunk), len(listed["Items"])

        started = time.monotonic()
        if not reads:
            await asyncio.gather(*(one(item, body) for item, body in bodies.items()))
            return time.monotonic() - started
        items = list(bodies)
        batches = [items[i : i + BATCH_SIZE] for i in range(0, len(items), BATCH_SIZE)]
        ahead = asyncio.create_task(read(batches[0]))
        writing: list[asyncio.Task[None]] = []
        for index, batch in enumerate(batches):
            await ahead
            if index + 1 < len(batches):
                ahead = asyncio.create_task(read(batches[index + 1]))
            before, writing = writing, [asyncio.create_task(one(i, bodies[i])) for i in batch]
            await asyncio.gather(*before)
        await asyncio.gather(*writing)
        return time.monotonic() - started


def floor_worker(spec_file: str) -> None:
    """Run :func:`floor_run` in this process (the floor's own process, like ``jfsync run``'s):
    read ``{"url", "user_id", "bodies", "reads"}`` from ``spec_file``, print
    ``{"seconds", "cpu_s"}``."""
    spec = json.loads(Path(spec_file).read_text())
    cpu = time.process_time()
    seconds = asyncio.run(
        floor_run(spec["url"], spec["user_id"], spec["bodies"], reads=spec["reads"])
    )
    print(json.dumps({"seconds": seconds, "cpu_s": time.process_time() - cpu}))


async def floor_process(
    url: str, user_id: str, bodies: dict[str, dict[str, object]], *, reads: bool = False
) -> tuple[float, float]:
    """:func:`floor_run` in a process of its own; return its seconds and its CPU seconds.

    The bare client runs outside this process for the same reason jfsync does: in here it
    would share one event loop (and one core) with the emulator it writes to, and never pay
    for a request crossing from one process to another, as jfsync and a real server do.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump({"url": url, "user_id": user_id, "bodies": bodies, "reads": reads}, spec)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--floor-worker",
            spec.name,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0, f"the floor client exited with {proc.returncode}"
        result = json.loads(out)
        return float(result["seconds"]), float(result["cpu_s"])
    finally:
        os.unlink(spec.name)  # a local temporary file


#: A pause between two writes arriving at a server that counts as a gap in the write stream.
IDLE_GAP_S = 0.005


def idle_gaps(times: list[float]) -> tuple[float, int]:
    """The seconds a server received no write between consecutive writes (at ``times``) at
    least :data:`IDLE_GAP_S` apart, and how many such gaps there were."""
    ordered = sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(ordered) if b - a >= IDLE_GAP_S]
    return sum(gaps), len(gaps)


def loop_cpu(proc: psutil.Process) -> float:
    """CPU seconds of ``proc``'s main thread (its event loop; SQLite's worker is another)."""
    for thread in proc.threads():
        if thread.id == proc.pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


async def status_counters(port: int) -> dict[str, object]:
    """The ``counters`` section of the subprocess's status endpoint."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/status") as response,
    ):
        body = await response.json()
    counters: dict[str, object] = body.get("counters", {})
    return counters


async def sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    """Record the peak RSS of ``pid`` until ``stop`` is set."""
    proc = psutil.Process(pid)
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], proc.memory_info().rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def quiet(port: int, echoes: int) -> None:
    """Wait (polling the status endpoint) until jfsync has applied ``echoes`` echoes."""
    async with asyncio.timeout(120):
        while int(str((await status_counters(port))["echoes"])) < echoes:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # another process: nothing here to wait on but its answers


async def one_burst(
    pid: int,
    status_port: int,
    a: Emulator,
    told: list[float],
    b: Emulator,
    floor: Emulator,
    read_floor: Emulator,
    writes: Writes,
    batch: list[str],
    rep: int,
    label: bool,
) -> dict[str, float]:
    """Mark ``batch`` played on ``a`` (repetition ``rep``: a new date and count), time it
    until ``b`` holds it, and the floor; print the figures and return them.

    The floor never runs while jfsync works: after the burst only once jfsync has applied
    ``b``'s echoes of it (run while this process still sends them, 10,000 entries after b's
    debounce, and jfsync applies them, the floor would be slowed by that work and the ratio
    flattered). Even repetitions run the burst first, odd ones the floor first, so a drift of
    the machine's speed over a run weighs on both alike. The floor with the compare reads
    (on ``read_floor``, an emulator of its own) runs right after the floor, on the same side.
    """
    when = datetime(2025, 6, 1, 20, 0, tzinfo=UTC) + timedelta(days=rep)
    target = PlayState(played=True, play_count=rep + 1, last_played_s=int(when.timestamp()))
    # ---- floor: the same writes, straight to an emulator with no jfsync attached.
    written = UserData(favorite=True, play_state=target)
    bodies = {item: update_body(written, frozenset({"play_state"})) for item in batch}
    floor_first = rep % 2 == 1
    if floor_first:
        floor_s, floor_cpu, floor_here = await served_floor(floor, bodies)
        read_floor_s, _, _ = await served_floor(read_floor, bodies, reads=True)
    timing = await jfsync_burst(pid, status_port, a, told, b, writes, batch, rep, target, when)
    if not floor_first:
        floor_s, floor_cpu, floor_here = await served_floor(floor, bodies)
        read_floor_s, _, _ = await served_floor(read_floor, bodies, reads=True)
    floor_idle_s, floor_idle_count = idle_gaps([r.time for r in floor.writes[-len(batch) :]])
    burst_s = timing["burst_s"]
    prefix = f"[{rep + 1}] " if label else ""
    print(
        f"{prefix}burst of {len(batch)} played on a: b has them all after {burst_s:.2f} s "
        f"({len(batch) / burst_s:.0f} writes/s); floor (bare aiohttp in its own process, "
        f"concurrency {CONCURRENCY}, run {'before' if floor_first else 'after'}) "
        f"{floor_s:.2f} s ({len(batch) / floor_s:.0f} writes/s); ratio {burst_s / floor_s:.2f}x"
    )
    print(
        f"{prefix}floor making the pusher's compare reads too (one listing of each batch of "
        f"{BATCH_SIZE}, read ahead): {read_floor_s:.2f} s ({read_floor_s / floor_s:.2f}x the "
        f"floor); jfsync's burst {burst_s / read_floor_s:.2f}x it"
    )
    told_s = timing["told_s"]
    print(
        f"{prefix}changes made on a in {timing['saved_s']:.2f} s and a's message sent after "
        f"{told_s:.2f} s; the first write reached b after {timing['first_write_s']:.2f} s "
        f"(a's message received, parsed and applied); from a's message to the last write "
        f"{burst_s - told_s:.2f} s, ratio {(burst_s - told_s) / floor_s:.2f}x"
    )
    print(
        f"{prefix}CPU during the burst: jfsync run {timing['cpu_jfsync_s']:.2f} s, the floor's "
        f"client {floor_cpu:.2f} s ({timing['cpu_jfsync_s'] / floor_cpu:.2f}x; jfsync's event "
        f"loop {timing['cpu_loop_s']:.2f} s, its other threads "
        f"{timing['cpu_jfsync_s'] - timing['cpu_loop_s']:.2f} s); this process "
        f"(emulators, checks) {timing['cpu_here_s']:.2f} s, {floor_here:.2f} s while it served "
        "the floor"
    )
    print(
        f"{prefix}b received no write for {timing['idle_s']:.2f} s in all during the burst "
        f"({timing['idle_count']:.0f} gaps of {IDLE_GAP_S * 1000:.0f} ms or more between the "
        f"first write and the last); the floor's server {floor_idle_s:.2f} s "
        f"({floor_idle_count} gaps)"
    )
    print(
        f"{prefix}jfsync run RSS: {timing['rss_start_mib']:.0f} MiB before the burst, "
        f"peak {timing['burst_peak_mib']:.0f} MiB during it, {timing['peak_rss_mib']:.0f} MiB "
        "until its echo was applied"
    )
    return {
        **timing,
        "floor_s": floor_s,
        "floor_cpu_s": floor_cpu,
        "floor_here_s": floor_here,
        "read_floor_s": read_floor_s,
    }


async def served_floor(
    floor: Emulator, bodies: dict[str, dict[str, object]], *, reads: bool = False
) -> tuple[float, float, float]:
    """:func:`floor_process` against ``floor``; return its seconds, its client's CPU seconds
    and this process's CPU seconds meanwhile (the emulator serving the writes), to set beside
    what this process spends serving jfsync's burst (a's message, b's compare reads and
    writes)."""
    here = sum(psutil.Process().cpu_times()[:2])
    seconds, cpu = await floor_process(floor.url, floor.user_id(USER), bodies, reads=reads)
    return seconds, cpu, sum(psutil.Process().cpu_times()[:2]) - here


def stamp_user_data_sends(emu: Emulator) -> list[float]:
    """The monotonic times at which ``emu`` sends each ``UserDataChanged`` message from now on
    (appended as they are sent; the socket hub is wrapped for the bench)."""
    stamps: list[float] = []
    hub = emu.hub
    real_send = hub._send

    async def send(conn: Any, payload: dict[str, Any]) -> bool:
        sent = await real_send(conn, payload)
        if sent and payload.get("MessageType") == "UserDataChanged":
            stamps.append(time.monotonic())
        return sent

    hub._send = send  # type: ignore[method-assign]
    return stamps


async def jfsync_burst(
    pid: int,
    status_port: int,
    a: Emulator,
    told: list[float],
    b: Emulator,
    writes: Writes,
    batch: list[str],
    rep: int,
    target: PlayState,
    when: datetime,
) -> dict[str, float]:
    """Mark ``batch`` played on ``a`` and time it until ``b`` holds ``target`` for every item;
    wait until jfsync has applied ``b``'s echoes. ``told`` gets the times ``a`` sends its
    ``UserDataChanged`` messages (:func:`stamp_user_data_sends`)."""
    echoes_before = int(str((await status_counters(status_port))["echoes"]))
    uid_a, uid_b = a.user_id(USER), b.user_id(USER)
    before = len(b.writes)
    peak = [0]
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, peak, stop_sampling), name="bench-rss-sampler")
    jfsync_proc = psutil.Process(pid)
    rss_start = jfsync_proc.memory_info().rss
    cpu_jfsync = sum(jfsync_proc.cpu_times()[:2])
    cpu_loop = loop_cpu(jfsync_proc)
    cpu_here = sum(psutil.Process().cpu_times()[:2])
    told_before = len(told)
    started = time.monotonic()
    for item in batch:
        a.save_user_data(uid_a, item, played=True, play_count=rep + 1, last_played=when)
    # Making the changes on a (this process) is part of the burst; say how much of it.
    saved_s = time.monotonic() - started
    await writes.wait(
        lambda: (
            len(b.writes) - before >= len(batch)
            and all(b.user_data(uid_b, i).play_state == target for i in batch)
        ),
        600,
        until=(b, before + len(batch)),
    )
    burst_s = time.monotonic() - started
    first_write_s = min(r.time for r in b.writes[before:]) - started
    # When a's message of the bulk action left (the changes saved, the message built): from
    # then on the time is jfsync's.
    told_s = told[told_before] - started
    idle_s, idle_count = idle_gaps([r.time for r in b.writes[before:]])
    cpu_jfsync = sum(jfsync_proc.cpu_times()[:2]) - cpu_jfsync
    cpu_loop = loop_cpu(jfsync_proc) - cpu_loop
    cpu_here = sum(psutil.Process().cpu_times()[:2]) - cpu_here
    burst_peak = peak[0]
    # Sampling goes on while b's debounced echo of the burst (one message of as many
    # entries) is received and applied: that is part of the burst's cost to jfsync too.
    await quiet(status_port, echoes_before + len(batch))
    stop_sampling.set()
    await sampler
    return {
        "burst_s": burst_s,
        "first_write_s": first_write_s,
        "saved_s": saved_s,
        "told_s": told_s,
        "cpu_jfsync_s": cpu_jfsync,
        "cpu_loop_s": cpu_loop,
        "idle_s": idle_s,
        "idle_count": idle_count,
        "cpu_here_s": cpu_here,
        "rss_start_mib": rss_start / 2**20,
        "burst_peak_mib": burst_peak / 2**20,
        "peak_rss_mib": peak[0] / 2**20,
        "started": started,
    }


#: Share of c's items alice has non-default data on. Each catch-up lists these (one request
#: per filter and page), diffs them against the ledger and walks every item of alice for the
#: backfill: at 2 % a catch-up of 100,000 items took 0.2-0.4 s, and jfsync's reconnect backoff
#: (1, 2, 4, 8 s ... after each drop) left about 1.4 s of catch-ups, some 140 changes, in a
#: 20 s phase. At 20 % each catch-up lists ten times as much and lasts seconds.
CATCHUP_SHARE = 0.2
#: Items of c the bench changes for alice each time it drops c's socket, so that every
#: catch-up finds (and applies) what changed while it was away, as after a real outage.
CATCHUP_EDITS = 100


def start_catchup_server(items: int) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """Start emulator ``c`` (``items`` items, :data:`CATCHUP_SHARE` of them non-default for
    alice) in its own process."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("bench_identity.py")),
            "serve",
            "--scenario",
            "catchup",
            "--name",
            "c",
            "--root",
            "/media/c",
            "--items",
            str(items),
            "--users",
            "1",
            "--share",
            str(CATCHUP_SHARE),
            # c's items must match none of a's and b's (a different path root, no provider
            # ids): its data would otherwise be merged into the items the bench measures.
            "--no-provider-ids",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    info: dict[str, object] = json.loads(proc.stdout.readline())
    return proc, info


async def wait_brought_up(status_port: int, server: str, timeout_s: float = 600) -> None:
    """Wait until every user jfsync syncs on ``server`` is connected: its socket is open and
    the catch-up that follows the connect (the first one: every item a first contact) is over.

    Not a count of catch-ups: a and b sync two users each (alice and bob), whose catch-ups
    finish first, so the three finished catch-ups waited for before said nothing about c's.
    Its 20,000 first contacts then ran into the latency phase, and at full size, while events
    flowed, took the whole phase: no catch-up window was left in it to measure.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{status_port}/status") as response,
            ):
                body = await response.json()
            users = next(
                (s.get("users", []) for s in body.get("servers", []) if s.get("name") == server),
                [],
            )
            if users and all(u.get("state") == "connected" for u in users):
                return
            await asyncio.sleep(CATCHUP_POLL_S)  # polling another process


async def edit_catchup_server(
    session: aiohttp.ClientSession, url: str, info: dict[str, object], round_: int
) -> None:
    """Change :data:`CATCHUP_EDITS` of c's items for alice (a favourite toggled, a different
    set each round), as if she used c while jfsync was away from it."""
    users = info["users"]
    items = info["items"]
    assert isinstance(users, dict)
    assert isinstance(items, list)
    uid = users[USER]
    start = (round_ * CATCHUP_EDITS) % max(1, len(items) - CATCHUP_EDITS)
    for item in items[start : start + CATCHUP_EDITS]:
        async with session.post(
            f"{url}/__emulator__/user-data/{uid}/{item}",
            json={"is_favorite": round_ % 2 == 0},
        ) as response:
            await response.read()


async def keep_catching_up(
    url: str,
    info: dict[str, object],
    status_port: int,
    stop: asyncio.Event,
    ends: list[float],
) -> None:
    """Drop c's websocket each time jfsync has finished catching up with it, until ``stop``;
    then wait for the catch-up under way to finish. ``ends`` gets the time each catch-up was
    seen finished (polled: up to :data:`CATCHUP_POLL_S` after it did). Right after each drop
    some of c's items are changed (:func:`edit_catchup_server`): every catch-up has news.

    Left running, that last catch-up (of up to 100,000 items) would run into the bursts,
    which would then measure a burst during a catch-up at some runs and not at others.
    """
    async with aiohttp.ClientSession() as session:
        scans = -1
        rounds = itertools.count()
        while not stop.is_set():
            scans = int(str((await status_counters(status_port))["scans"]))
            async with session.post(f"{url}/__emulator__/drop-sockets") as response:
                await response.read()
            await edit_catchup_server(session, url, info, next(rounds))
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CATCHUP_POLL_S)  # another process
                if int(str((await status_counters(status_port))["scans"])) > scans:
                    ends.append(time.monotonic())
                    scans = -1
                    break
        async with asyncio.timeout(300):
            while scans >= 0 and int(str((await status_counters(status_port))["scans"])) <= scans:  # noqa: ASYNC110
                await asyncio.sleep(CATCHUP_POLL_S)  # polling another process
            if scans >= 0:
                ends.append(time.monotonic())


#: How often the bench asks jfsync's status whether the catch-up of c is over.
CATCHUP_POLL_S = 0.25


async def catchup_windows(url: str, ends: list[float], since: float) -> list[tuple[float, float]]:
    """The spans during which jfsync was catching up with c: from the first catch-up listing
    c answered after the previous catch-up ended (a request for the user's items with a
    ``filters`` query: played, favourite, resumable, liked, disliked) to the moment this one
    was seen finished.

    Only listings after ``since`` (the first drop) count: the catch-up of c's bring-up is
    not one of these. Read from c's own request log (its clock is this machine's monotonic
    clock, as ours).
    """
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/__emulator__/requests") as response,
    ):
        records = (await response.json())["requests"]
    listings = sorted(
        float(r["time"])
        for r in records
        if r["method"] == "GET"
        and not r["is_control"]
        and "/Items" in r["path"]
        and any(key.lower() == "filters" for key in r["query"])
    )
    windows: list[tuple[float, float]] = []
    previous = since
    for end in ends:
        started = [t for t in listings if previous < t <= end]
        if started:
            windows.append((started[0], end))
        previous = end
    return windows


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def run(
    changes: int,
    rate: float,
    burst: int,
    profile: str | None,
    repeat: int = 1,
    catchup_items: int = 0,
    jfsync_path: Path | None = None,
) -> None:
    """Start everything, measure, print, clean up."""
    leaves = max(burst, changes) + 10
    built = time.monotonic()
    emus = [
        Emulator(api_key=API_KEY, server_name=name, library_size=leaves, seed=3, debounce_s=0.0)
        for name in ("a", "b", "floor", "read-floor")
    ]
    a, b, floor, read_floor = emus
    told = stamp_user_data_sends(a)
    for emu in emus:
        await emu.start()
    print(f"emulators: {leaves} leaf items each, built in {time.monotonic() - built:.1f} s")
    items = [item.id for item in a.leaf_items()]
    writes = Writes()
    emulator_module.request_observers.append(writes.observe)
    uid_a, uid_b = a.user_id(USER), b.user_id(USER)
    figures: dict[str, object] = {
        "changes": changes,
        "rate": rate,
        "burst": burst,
        "repeat": repeat,
        "catchup_items": catchup_items,
    }
    servers = [(emu.server_name, emu.url) for emu in (a, b)]
    c_proc: subprocess.Popen[str] | None = None
    c_info: dict[str, object] = {}
    if catchup_items:
        built = time.monotonic()
        c_proc, c_info = start_catchup_server(catchup_items)
        servers.append(("c", str(c_info["url"])))
        print(f"emulator c: {catchup_items} items, built in {time.monotonic() - built:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "jfsync.yaml"
        stalls = Path(tmp) / "stalls.txt"
        status_port = free_port()
        config.write_text(config_text(servers, Path(tmp) / "ledger.db", status_port))
        # The jfsync run under test: this checkout's, or another tree's (--jfsync-path).
        env = {**os.environ, "PYTHONPATH": str(jfsync_path or ROOT)}
        command = ["-m", "jfsync", "run", "--config", str(config)]
        if profile:
            command = ["-m", "cProfile", "-o", profile, *command]
        else:
            probe = str(Path(__file__).with_name("looplag.py"))
            command = [probe, "--out", str(stalls), *command]
        proc_started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(sys.executable, *command, env=env)
        try:
            # Ready when a probe change made on a has reached b.
            started = time.monotonic()
            probe = items[-1]
            a.save_user_data(uid_a, probe, is_favorite=True)
            await writes.wait(lambda: b.user_data(uid_b, probe).favorite, 120)
            ready = time.monotonic()
            figures["start_s"] = ready - proc_started
            figures["start_stall_ms"] = worst_between(stalls, proc_started, ready)
            print(
                f"jfsync run: first change through {ready - started:.1f} s after start "
                f"(worst loop stall {figures['start_stall_ms']:.0f} ms)"
            )
            if catchup_items:
                # c's bring-up (its 100,000-item index scan, the match and its first catch-up)
                # is over before the latency phase: a bring-up is not a catch-up, and its
                # tail fell into the first window, which held the worst samples of a run.
                await wait_brought_up(status_port, "c")
                brought_up = time.monotonic()
                figures["catchup_bring_up_s"] = brought_up - proc_started
                print(
                    f"c brought up (index scan, match, first catch-up) "
                    f"{brought_up - proc_started:.1f} s after start (worst loop stall "
                    f"{worst_between(stalls, ready, brought_up):.0f} ms since the first change)"
                )
            stop_catchups = asyncio.Event()
            catchup_ends: list[float] = []
            catchups_from = time.monotonic()
            catching_up = (
                asyncio.create_task(
                    keep_catching_up(
                        str(servers[2][1]), c_info, status_port, stop_catchups, catchup_ends
                    ),
                    name="bench-catchups",
                )
                if catchup_items
                else None
            )

            # ---- latency: one favourite per item at a steady rate.
            done_at: dict[str, float] = {}
            made_at: dict[str, float] = {}
            wanted = items[:changes]
            index = {item: n for n, item in enumerate(wanted)}
            seen = len(b.writes)

            def collect() -> bool:
                # Only a write made after the change counts: writes owed to b from the start
                # (c's data, with --catchup-items) may still reach the same items.
                nonlocal seen
                for record in b.writes[seen:]:
                    item = record.item_id
                    if item in index and record.status < 300 and record.time >= made_at[item]:
                        done_at.setdefault(item, record.time)
                seen = len(b.writes)
                return len(done_at) == len(wanted)

            # The emulators a and b run on this process's loop: a stall here delays a change's
            # message and the write's arrival alike, and is not jfsync's (printed, not removed).
            bench_lag = LoopLag().start()
            t0 = time.monotonic()
            for n, item in enumerate(wanted):
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                made_at[item] = time.monotonic()
                a.save_user_data(uid_a, item, is_favorite=True)
            await writes.wait(collect, 60)
            figures["latency_bench_stall_ms"] = await bench_lag.stop()
            stop_catchups.set()
            if catching_up is not None:
                await catching_up
            lat_ms = [(done_at[i] - made_at[i]) * 1000 for i in wanted]
            figures.update(
                latency_p50_ms=pct(lat_ms, 50),
                latency_p99_ms=pct(lat_ms, 99),
                latency_max_ms=max(lat_ms),
                catchups_during_latency=len(catchup_ends),
                latency_stall_ms=worst_between(stalls, t0, time.monotonic()),
            )
            # The goal is the latency while a catch-up runs: the changes made inside one. The
            # changes made outside every catch-up are printed beside them: the same path on
            # the same machine in the same minutes, the load of the machine without the
            # catch-up's (what the catch-up adds is the difference).
            during: list[float] = []
            outside: list[float] = []
            if catchup_items:
                windows = await catchup_windows(str(servers[2][1]), catchup_ends, catchups_from)
                for i in wanted:
                    inside = any(start <= made_at[i] <= end for start, end in windows)
                    (during if inside else outside).append((done_at[i] - made_at[i]) * 1000)
                last_made = made_at[wanted[-1]]
                covered = sum(
                    max(0.0, min(end, last_made) - max(start, t0)) for start, end in windows
                )
                figures.update(
                    latency_catchup_changes=len(during),
                    latency_catchup_cover_s=covered,
                    latency_catchup_p50_ms=pct(during, 50) if during else None,
                    latency_catchup_p99_ms=pct(during, 99) if during else None,
                    latency_outside_changes=len(outside),
                    latency_outside_p50_ms=pct(outside, 50) if outside else None,
                    latency_outside_p99_ms=pct(outside, 99) if outside else None,
                )
            print(
                f"latency over {len(wanted)} changes at {rate:g}/s: "
                f"p50 {pct(lat_ms, 50):.1f} ms, p95 {pct(lat_ms, 95):.1f} ms, "
                f"p99 {pct(lat_ms, 99):.1f} ms, max {max(lat_ms):.1f} ms, "
                f"mean {statistics.fmean(lat_ms):.1f} ms"
                + (
                    f"; {len(catchup_ends)} catch-ups of c ({catchup_items} items) meanwhile"
                    if catchup_items
                    else ""
                )
                + f"; worst loop stall {figures['latency_stall_ms']:.0f} ms (this process, "
                f"the emulators a and b: {figures['latency_bench_stall_ms']:.0f} ms)"
            )
            if catchup_items:
                print(
                    f"latency of the {len(during)} changes made while a catch-up of c ran "
                    f"({len(windows)} catch-ups of "
                    + ", ".join(f"{end - start:.1f}" for start, end in windows)
                    + f" s; {figures['latency_catchup_cover_s']:.1f} s of the "
                    f"{made_at[wanted[-1]] - t0:.1f} s phase): "
                    + (
                        f"p50 {pct(during, 50):.1f} ms, p95 {pct(during, 95):.1f} ms, "
                        f"p99 {pct(during, 99):.1f} ms, max {max(during):.1f} ms"
                        if during
                        else "none"
                    )
                )
                if outside:
                    print(
                        f"latency of the {len(outside)} changes made outside the catch-ups "
                        f"(for comparison): p50 {pct(outside, 50):.1f} ms, "
                        f"p95 {pct(outside, 95):.1f} ms, p99 {pct(outside, 99):.1f} ms, "
                        f"max {max(outside):.1f} ms"
                    )

            # ---- burst: mark `burst` items played on a at once. b echoes with Jellyfin's own
            # 500 ms debounce (one message per quiet half second, as a real server sends
            # them); a keeps 0 so the clock starts when jfsync can know of the change.
            b.set_debounce(JELLYFIN_DEBOUNCE_S)
            batch = items[:burst]
            timings = []
            for rep in range(repeat):
                timing = await one_burst(
                    proc.pid,
                    status_port,
                    a,
                    told,
                    b,
                    floor,
                    read_floor,
                    writes,
                    batch,
                    rep,
                    repeat > 1,
                )
                # The burst and its echo (the floor after them is not jfsync's).
                timing["stall_ms"] = worst_between(
                    stalls, timing["started"], timing["started"] + timing["burst_s"]
                )
                timings.append(timing)
            bursts = statistics.median(t["burst_s"] for t in timings)
            floors = statistics.median(t["floor_s"] for t in timings)
            read_floors = statistics.median(t["read_floor_s"] for t in timings)
            from_message = statistics.median(t["burst_s"] - t["told_s"] for t in timings)
            figures.update(
                burst_s=[t["burst_s"] for t in timings],
                burst_floor_s=[t["floor_s"] for t in timings],
                burst_median_s=bursts,
                burst_floor_median_s=floors,
                burst_read_floor_s=[t["read_floor_s"] for t in timings],
                burst_from_message_s=[t["burst_s"] - t["told_s"] for t in timings],
                burst_from_message_median_s=from_message,
                told_s=[t["told_s"] for t in timings],
                burst_read_floor_median_s=read_floors,
                first_write_s=[t["first_write_s"] for t in timings],
                burst_cpu_s=[t["cpu_jfsync_s"] for t in timings],
                burst_floor_cpu_s=[t["floor_cpu_s"] for t in timings],
                burst_server_cpu_s=[t["cpu_here_s"] for t in timings],
                burst_floor_server_cpu_s=[t["floor_here_s"] for t in timings],
                burst_peak_rss_mib=max(t["peak_rss_mib"] for t in timings),
                burst_stall_ms=max(t["stall_ms"] for t in timings),
            )
            print(f"worst loop stall during the bursts: {figures['burst_stall_ms']:.0f} ms")
            if repeat > 1:
                # Both timings vary with the machine's speed; the ratio of their medians is
                # steadier than any one burst's ratio.
                ratios = [t["burst_s"] / t["floor_s"] for t in timings]
                cpus = [t["cpu_jfsync_s"] / t["floor_cpu_s"] for t in timings]
                print(
                    f"burst ratios over {repeat} repetitions: "
                    + ", ".join(f"{r:.2f}x" for r in ratios)
                    + f"; median {statistics.median(ratios):.2f}x; medians: jfsync {bursts:.2f} s, "
                    f"floor {floors:.2f} s, ratio {bursts / floors:.2f}x; CPU against the "
                    "floor's client: " + ", ".join(f"{r:.2f}x" for r in cpus)
                )
                print(
                    f"from a's message to the last write: median {from_message:.2f} s, "
                    f"{from_message / floors:.2f}x the floor"
                )
                print(
                    f"floor making the compare reads too: median {read_floors:.2f} s "
                    f"({read_floors / floors:.2f}x the floor); jfsync's burst "
                    f"{bursts / read_floors:.2f}x it"
                )
            counters = await status_counters(status_port)
            print(
                "jfsync counters: "
                + ", ".join(f"{k} {v}" for k, v in counters.items() if isinstance(v, int))
            )
            figures["stall_ms"] = worst_between(stalls, proc_started, time.monotonic())
            emit("replication", **figures)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    code = await proc.wait()
                print(f"jfsync run exited with {code} after SIGTERM")
            emulator_module.request_observers.remove(writes.observe)
            for emu in emus:
                await emu.close()
            if c_proc is not None:
                assert c_proc.stdin is not None
                c_proc.stdin.close()
                c_proc.wait(timeout=30)


def main() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=2000, help="latency changes")
    parser.add_argument("--rate", type=float, default=100.0, help="latency changes per second")
    parser.add_argument("--burst", type=int, default=10_000, help="items marked played at once")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="bursts in a row (each a new play date on the same items); prints the median ratio",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="profile jfsync run with cProfile into FILE (pstats)"
    )
    parser.add_argument(
        "--catchup-items",
        type=int,
        default=0,
        help="a third server of this many items, caught up again and again during the latency",
    )
    parser.add_argument(
        "--jfsync-path",
        metavar="DIR",
        type=Path,
        help="run the jfsync package found in DIR (for example another commit's, extracted "
        "with git archive) instead of this checkout's; the emulators and floors stay this one's",
    )
    parser.add_argument("--floor-worker", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_worker:
        floor_worker(args.floor_worker)
        return
    # The emulators here hold three libraries: the collector tuned as jfsync run tunes its own,
    # so that full collections walking them do not stall the servers under either run.
    tune_garbage_collector()
    asyncio.run(
        run(
            args.changes,
            args.rate,
            args.burst,
            args.profile,
            args.repeat,
            args.catchup_items,
            args.jfsync_path,
        )
    )


if __name__ == "__main__":
    main()
