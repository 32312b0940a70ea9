"""Config edits while jfsync runs: applied without a restart, refused whole when invalid.

Emulators over loopback, jfsync between them, its config in a YAML file watched by a
:class:`ConfigReloader` on a manual clock (the poll) or told by SIGHUP (a real signal to this
process, caught by :func:`run_service`). The oracle of the load test is what the user did last
on each item: whatever the edits did meanwhile, every server ends holding it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from jfsync.model import UserData
from jfsync.ops import statuscmd
from jfsync.ops.reloader import ConfigReloader
from jfsync.ops.runcmd import run_service
from jfsync.timing import ManualClock
from tests.replication.conftest import MakeCluster
from tests.replication.harness import WAIT_S, Cluster, UserClient
from tests.support.config import config_dict

pytestmark = pytest.mark.timeout(60)


def _write(path: Path, data: dict[str, Any] | str) -> None:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # as editors save: a new file in one step


def _config_file(cluster: Cluster, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The running config as a YAML file, and its data to edit."""
    data = config_dict(
        cluster.emus,
        ledger=cluster.service.config.ledger,
        timeout_s=5,
        sync={"shutdown_grace": 2},
    )
    path = tmp_path / "jfsync.yaml"
    _write(path, data)
    return path, data


async def _poll(reloader: ConfigReloader, clock: ManualClock, attempts: int) -> None:
    """Let the watcher's next poll run, and wait until it tried ``attempts`` reloads."""
    await clock.wait_for_sleepers(1)
    await clock.advance(reloader.poll_s)
    await reloader.wait_attempts(attempts, WAIT_S)


async def test_an_invalid_edit_is_refused_and_a_valid_one_applied(
    make_cluster: MakeCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    try:
        # The operator saves a typo: refused, the running config stays, and both say why.
        data["servers"][1]["mode"] = "sideways"
        _write(path, data)
        await _poll(reloader, clock, 1)
        status = (await cluster.service.status())["config"]
        assert "servers[1].mode" in status["last_error"]
        assert "sideways" in status["last_error"]
        assert "servers[1].mode" in caplog.text
        assert cluster.service.config.server("b").mode == "both"
        # Replication goes on under the running config.
        item, other = cluster.free_items[:2]
        cluster.change(b, item, is_favorite=True)
        await cluster.wait_all_hold(item, UserData(favorite=True))

        # Fixed: b only receives from now on.
        data["servers"][1]["mode"] = "receive"
        _write(path, data)
        await _poll(reloader, clock, 2)
        status = (await cluster.service.status())["config"]
        assert status["last_error"] is None
        assert "server b: mode both -> receive" in status["last_changes"]
        cluster.change(b, other, is_favorite=True)
        cluster.change(a, item, is_favorite=False)
        await cluster.wait_all_hold(item, UserData(favorite=False))
        await cluster.service.wait_for(
            lambda: cluster.service.counters.events_received >= 4, WAIT_S
        )
        await cluster.wait_quiet([other])
        assert cluster.data(a, other) == UserData()
        # Nothing more to do while the file stays as it is.
        await clock.wait_for_sleepers(1)
        await clock.advance(reloader.poll_s * 3)
        assert reloader.attempts == 2
    finally:
        await reloader.stop()


async def test_sighup_reads_the_file_again(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = await make_cluster(2, connect=False)
    service = cluster.service
    await service.stop()  # run_service starts it itself
    path, data = _config_file(cluster, tmp_path)
    fresh = type(service)(service.config)
    run = asyncio.create_task(
        run_service(
            fresh.config, service=fresh, config_path=path, backstop=False, reload_poll_s=3600
        )
    )
    try:
        await fresh.wait_for(lambda: fresh.config_status is not None and bool(fresh.links))
        data["users"] = {"choices": {"bob": {"sync": False}}}
        _write(path, data)
        os.kill(os.getpid(), signal.SIGHUP)

        def applied() -> bool:
            status = fresh.config_status or {}
            return any("users" in line for line in status.get("last_changes", []))

        await fresh.wait_for(applied, WAIT_S)
        assert fresh.config.users.opted_out() == {"bob"}
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await run == 0


async def test_config_reload_under_load_loses_no_change(
    make_cluster: MakeCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jfsync")
    cluster = await make_cluster(3)
    a, b = cluster.emus[:2]
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    items = cluster.free_items[:12]
    expected: dict[str, UserData] = {}
    counter = 0

    def act(count: int) -> None:
        """The user changes a few items, each always on its own server (a or b)."""
        nonlocal counter
        for _ in range(count):
            counter += 1
            item = items[counter % len(items)]
            emu = a if items.index(item) % 2 == 0 else b
            if counter % 3 == 0:
                expected[item] = cluster.change(emu, item, rating=float(counter % 10))
            else:  # played once more, as a player reports it
                expected[item] = cluster.change(emu, item, played=True, play_count=counter)

    c_entry = data["servers"][2]
    edits: list[dict[str, Any] | str] = []
    edits.append({**data, "users": {"choices": {"bob": {"fields": ["favorite"]}}}})
    edits.append({**edits[-1], "sync": {**data["sync"], "reconcile_interval": "1h"}})
    edits.append({**edits[-1], "servers": data["servers"][:2]})  # c removed
    edits.append("servers: [this is not a config")  # a broken save in between
    edits.append({**edits[-3], "servers": [*data["servers"][:2], c_entry]})  # c back
    slower = {**data["servers"][0], "timeout_s": 6}
    edits.append({**edits[-1], "servers": [slower, *edits[-1]["servers"][1:]]})
    b_filtered = {**data["servers"][1], "libraries": {"exclude": ["Home videos"]}}
    edits.append({**edits[-1], "servers": [slower, b_filtered, c_entry]})
    try:
        act(6)
        await cluster.settle()  # c holds everything once before it is taken out
        for done, edit in enumerate(edits, start=1):
            act(4)
            _write(path, edit)
            await clock.wait_for_sleepers(1)
            await clock.advance(reloader.poll_s)
            act(4)  # while the reload is under way
            await reloader.wait_attempts(done, WAIT_S)
            act(4)
        await cluster.wait_connected()  # the sentinels of settle() go through sockets
        await cluster.settle()
        for item, state in expected.items():
            for emu in cluster.emus:
                assert cluster.data(emu, item) == state, (
                    emu.server_name,
                    item,
                    cluster.data(emu, item),
                    state,
                )
    finally:
        await reloader.stop()
    assert "this is not a config" not in str(cluster.service.config)
    assert "not valid YAML" in caplog.text
    assert reloader.status["last_error"] is None
    assert [s.name for s in cluster.service.config.servers] == ["a", "b", "c"]
    assert cluster.service.config.server("a").timeout_s == 6


async def test_a_removed_server_is_owed_nothing_and_a_readded_one_catches_up(
    make_cluster: MakeCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jfsync")
    cluster = await make_cluster(3)
    a, _, c = cluster.emus
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    service = cluster.service
    first, second, third = cluster.free_items[:3]
    try:
        played = cluster.change(a, first, played=True)
        await cluster.wait_all_hold(first, played)
        # c starts refusing writes (down for maintenance): what the user does queues for it.
        c.fail_next_writes(1_000_000, 503)
        cluster.change(a, second, is_favorite=True)
        await service.wait_for(lambda: cluster.data(cluster.emus[1], second).favorite, WAIT_S)
        await service.wait_for(lambda: service.ledger.outbox_depth("c"), WAIT_S)
        # The operator takes c out of the config: its queue is dropped, with a log line.
        _write(path, {**data, "servers": data["servers"][:2]})
        await _poll(reloader, clock, 1)
        assert "[c] dropped 1 queued writes (no longer in the config)" in caplog.text
        assert "c" not in service.links
        # Meanwhile the user goes on, on a: only a and b are kept in step.
        rated = cluster.change(a, third, rating=4.0)
        await service.wait_for(lambda: cluster.data(cluster.emus[1], third) == rated, WAIT_S)
        assert cluster.data(c, third) == UserData()
        # c is back (and answers again): everything it missed reaches it.
        c.fail_next_writes(0)
        _write(path, data)
        await _poll(reloader, clock, 2)
        await cluster.wait_connected()  # the sentinels of settle() go through sockets
        await cluster.settle()
        assert cluster.data(c, first) == played
        assert cluster.data(c, second) == UserData(favorite=True)
        assert cluster.data(c, third) == rated
        assert "[c] back in the config" in caplog.text
    finally:
        await reloader.stop()


async def test_a_send_only_server_made_both_gets_what_it_missed(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(2, server_keys={"a": {"mode": "send"}})
    a, b = cluster.emus
    path, data = _config_file(cluster, tmp_path)
    data["servers"][0]["mode"] = "send"
    _write(path, data)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    item = cluster.free_items[0]
    try:
        # While a only sends, the user favourites an item on b: a is left alone.
        cluster.change(b, item, is_favorite=True)
        key = await cluster.key("b", item)
        await cluster.service.wait_for(
            lambda: cluster.service.ledger.last_known("b", "name:alice", key), WAIT_S
        )
        await cluster.wait_quiet([item])
        assert cluster.data(a, item) == UserData()
        # a becomes an ordinary server: it is sent what it missed.
        data["servers"][0]["mode"] = "both"
        _write(path, data)
        await _poll(reloader, clock, 1)
        await cluster.wait_all_hold(item, UserData(favorite=True))
    finally:
        await reloader.stop()


async def test_a_library_filter_edited_while_running(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(2)
    a, b = cluster.emus
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    library = a.library
    episodes = [i for i in cluster.free_items if "/tv/" in (library.get(i).path or "")]  # type: ignore[union-attr]
    first, second = episodes[:2]
    try:
        played = cluster.change(a, first, played=True)
        await cluster.wait_all_hold(first, played)
        # b leaves its Shows library out from now on.
        data["servers"][1]["libraries"] = {"exclude": ["Shows"]}
        _write(path, data)
        await _poll(reloader, clock, 1)
        rated = cluster.change(a, first, rating=7.0)
        favourite = cluster.change(a, second, is_favorite=True)
        await cluster.service.wait_for(
            lambda: cluster.service.counters.events_received >= 3, WAIT_S
        )
        await cluster.wait_quiet([first, second])
        assert cluster.data(b, first) == played
        assert cluster.data(b, second) == UserData()
        # Shows is synced again: a first meeting for its items, and b gets what it lacks.
        del data["servers"][1]["libraries"]
        _write(path, data)
        await _poll(reloader, clock, 2)
        await cluster.wait_all_hold(first, rated)
        await cluster.wait_all_hold(second, favourite)
    finally:
        await reloader.stop()


async def test_turning_rewatch_protection_off_in_the_file_spreads_the_next_rewatch(
    make_cluster: MakeCluster, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster(2, server_version="10.11.11")
    a = cluster.emus[0]
    film = next(
        i for i in a.leaf_items() if i.type == "Movie" and (i.run_time_ticks or 0) > 6 * 10**9
    )
    player = UserClient(http, a)
    # The user has watched the film; every server shows it played.
    assert await player.call("POST", f"/UserPlayedItems/{film.id}") == 200
    await cluster.wait_all_hold(film.id, cluster.data(a, film.id))

    # The operator turns rewatch protection off in the running config...
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    try:
        data["sync"]["rewatch_protection"] = False
        _write(path, data)
        await _poll(reloader, clock, 1)
        status = (await cluster.service.status())["config"]
        assert status["last_error"] is None
        assert any("rewatch_protection" in line for line in status["last_changes"])
    finally:
        await reloader.stop()

    # ...so starting it again on a (10.11 un-plays it) now shows unplayed on b too.
    assert await player.call("POST", "/Sessions/Playing", {"ItemId": film.id}) == 204
    started = cluster.data(a, film.id)
    assert not started.play_state.played
    await cluster.wait_all_hold(film.id, started)


async def test_an_alerts_section_added_while_running_is_used(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(2)
    assert (await cluster.service.status())["alerts"]["targets"] == []
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    try:
        data["alerts"] = {
            "targets": [{"name": "phone", "kind": "ntfy", "url": "http://127.0.0.1:9/jfsync"}]
        }
        _write(path, data)
        await _poll(reloader, clock, 1)
        status = await cluster.service.status()
        assert status["config"]["last_error"] is None
        assert "alerts changed" in status["config"]["last_changes"]
        assert [t["target"] for t in status["alerts"]["targets"]] == ["phone"]
    finally:
        await reloader.stop()


async def test_jfsync_status_says_an_edit_was_refused_and_why(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = await make_cluster(2)
    path, data = _config_file(cluster, tmp_path)
    clock = ManualClock()
    reloader = ConfigReloader(cluster.service, path, clock=clock)
    reloader.start()
    try:
        data["sync"]["reconcile_interval"] = "soon"
        _write(path, data)
        await _poll(reloader, clock, 1)
        _, problems = statuscmd.render(await cluster.service.status())
        said = [p.text for p in problems if "was refused" in p.text]
        assert len(said) == 1, [p.text for p in problems]
        assert str(path) in said[0]
        assert "sync.reconcile_interval" in said[0]
        assert "the running config stays" in said[0]
    finally:
        await reloader.stop()
