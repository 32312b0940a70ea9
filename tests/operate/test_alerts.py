"""Alerts, received on loopback in the three formats: a peer down too long, its recovery, dead
rows, retries with backoff while replication goes on, and no secret in any log.

The alerter runs on a :class:`ManualClock` (its checks and its retry delays); the servers, the
pushers and the receiver run for real on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from jfsync.config import AlertsConfig, ConfigError, parse_config
from jfsync.ops.alerts import find_incidents
from jfsync.timing import ManualClock
from tests.operate.conftest import KEYS, WAIT_S, Stack, StackFactory

pytestmark = pytest.mark.timeout(60)

HOOK_TOKEN = "hook-token-8f2b6d1a"
NTFY_TOKEN = "tk_ntfy3e9c7a5b1d"
GOTIFY_TOKEN = "AgotifyQx7pLm2N"
TOPIC = "jfsync-alerts-6c1e"
CHECK_S = 60.0


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A loopback server taking alerts; ``fail`` answers 500 to that many requests first."""

    url: str = ""
    got: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    fail: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500, text="busy")
        await self.got.put(
            Received(request.path, dict(request.query), dict(request.headers), await request.read())
        )
        return web.json_response({"ok": True})

    async def take(self, count: int) -> dict[str, Received]:
        """The next ``count`` requests, by path."""
        found: dict[str, Received] = {}
        async with asyncio.timeout(WAIT_S):
            for _ in range(count):
                item = await self.got.get()
                found[item.path] = item
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


def _alerts(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "alerts": {
            "peer_down_after": "5m",
            "check_interval": f"{CHECK_S:g}s",
            "targets": [
                {"kind": "webhook", "url": f"{receiver.url}/hook", "token": HOOK_TOKEN},
                {
                    "kind": "ntfy",
                    "url": f"{receiver.url}/{TOPIC}",
                    "token": NTFY_TOKEN,
                    "name": "phone",
                },
                {"kind": "gotify", "url": f"{receiver.url}/gotify", "token": GOTIFY_TOKEN},
            ],
            **extra,
        }
    }


async def _stack(
    make_stack: StackFactory, receiver: Receiver, delays: list[float] | None = None
) -> tuple[Stack, ManualClock]:
    clock = ManualClock()
    options: dict[str, Any] = {"clock": clock}
    if delays is not None:
        options["delays"] = lambda: iter(delays)
    stack = await make_stack(
        config_extra=_alerts(receiver), service_options={"alert_options": options}
    )
    await clock.wait_for_sleepers(1)  # the first check is done
    return stack, clock


async def _checks(clock: ManualClock, count: int = 1, sleepers: int = 1) -> None:
    """Let the alerter check ``count`` more times (each check ends parked in its sleep)."""
    for _ in range(count):
        await clock.advance(CHECK_S)
        await clock.wait_for_sleepers(sleepers)


async def test_a_peer_down_too_long_is_sent_once_in_each_format_and_so_is_its_recovery(
    make_stack: StackFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack, clock = await _stack(make_stack, receiver)
    await stack.cabin.stop_listener()

    def sockets_down() -> bool:
        return all(
            str(s.status.state) != "connected"
            for s in stack.service.links["cabin"].subscribers.values()
        )

    await stack.wait_for(sockets_down)
    # An error text quoting a secret (a proxy echoing the key): masked in every alert.
    stack.service.links["cabin"].last_error = f"proxy said: bad key {KEYS['cabin']}"
    # Seen down at the next check, then down for 4 minutes: nothing is sent.
    await _checks(clock, 5)
    assert receiver.got.empty()
    await _checks(clock, 1)  # five minutes
    got = await receiver.take(3)
    assert set(got) == {"/hook", f"/{TOPIC}", "/gotify/message"}

    hook = got["/hook"]
    assert hook.headers["Authorization"] == f"Bearer {HOOK_TOKEN}"
    body = hook.json()
    assert body["event"] == "peer_down"
    assert body["state"] == "firing"
    assert body["server"] == "cabin"
    assert "cabin" in body["title"]

    ntfy = got[f"/{TOPIC}"]
    assert ntfy.headers["Authorization"] == f"Bearer {NTFY_TOKEN}"
    assert "cabin" in ntfy.headers["Title"]
    assert ntfy.headers["Priority"] == "high"
    assert ntfy.headers["Tags"] == "warning"
    assert "cabin cannot be reached (proxy said: bad key ***)" in ntfy.body.decode()
    for received in got.values():
        assert KEYS["cabin"] not in received.body.decode()

    gotify = got["/gotify/message"]
    assert gotify.headers["X-Gotify-Key"] == GOTIFY_TOKEN
    message = gotify.json()
    assert set(message) == {"title", "message", "priority"}
    assert message["priority"] == 8
    assert "cabin" in message["title"]

    # Still down at the next checks: not sent again.
    await _checks(clock, 3)
    assert receiver.got.empty()
    status = json.loads((await stack.get("/status"))[1])["alerts"]
    assert [o["key"] for o in status["open"]] == ["peer_down:cabin"]
    assert {t["target"]: t["sent"] for t in status["targets"]} == {
        "webhook 127.0.0.1": 1,
        "phone": 1,
        "gotify 127.0.0.1": 1,
    }

    # Cabin returns: one "resolved" in each format.
    await stack.cabin.start_listener()
    await stack.wait_connected()
    await _checks(clock, 1)
    got = await receiver.take(3)
    assert got["/hook"].json()["state"] == "resolved"
    assert got[f"/{TOPIC}"].headers["Tags"] == "white_check_mark"
    assert "reachable again" in got[f"/{TOPIC}"].body.decode()
    assert got["/gotify/message"].json()["priority"] == 4
    await _checks(clock, 2)
    assert receiver.got.empty()

    for secret in (HOOK_TOKEN, NTFY_TOKEN, GOTIFY_TOKEN, TOPIC, KEYS["cabin"]):
        assert secret not in caplog.text
        assert secret not in (await stack.get("/status"))[1]


async def test_a_target_that_fails_is_retried_and_replication_goes_on(
    make_stack: StackFactory, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stack, clock = await _stack(make_stack, receiver, delays=[30.0, 30.0, 30.0, 30.0, 30.0])
    # Every target answers 500 at first: 3 targets x 2 failures.
    receiver.fail = 6
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, stack.items[0], rating=4.0)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)
    await clock.advance(CHECK_S)
    # The checker and the three senders, each waiting for its retry.
    await clock.wait_for_sleepers(4)
    assert receiver.got.empty()
    # Meanwhile changes keep flowing.
    await stack.flow(stack.home, stack.items[1], is_favorite=True)
    await stack.flow(stack.cabin, stack.items[2], played=True)

    await clock.advance(30.0)
    await clock.wait_for_sleepers(4)  # second attempts failed too
    assert receiver.got.empty()
    await clock.advance(30.0)
    got = await receiver.take(3)
    assert got["/hook"].json()["event"] == "dead_rows"
    assert "parked" in got[f"/{TOPIC}"].headers["Title"]
    assert "404" in got["/gotify/message"].json()["message"]
    assert "retrying in 30 s" in caplog.text
    assert "HTTP 500" in caplog.text

    # Retried on the page's button: the rows go, and so does the incident.
    status, _ = await stack.get("/retry-dead", method="POST")
    assert status == 200
    await stack.wait_for(lambda: stack.user_data(stack.cabin, stack.items[0]).rating == 4.0)
    await clock.wait_for_sleepers(1)
    await _checks(clock, 1)
    got = await receiver.take(3)
    assert got["/hook"].json()["state"] == "resolved"
    assert "no dead rows" in got["/hook"].json()["message"]
    for secret in (HOOK_TOKEN, NTFY_TOKEN, GOTIFY_TOKEN, TOPIC):
        assert secret not in caplog.text


def test_which_snapshots_make_incidents() -> None:
    """The rules, on snapshots as /status shows them: holds, restores, refused sockets."""
    config = AlertsConfig()
    snap: dict[str, Any] = {
        "servers": [
            {
                "name": "home",
                "reachable": True,
                "users": [
                    {"user": "alice", "state": "auth_failed", "pause_reason": "token refused"},
                    {"user": "bob", "state": "connected"},
                ],
                "outbox": {"depth": 0, "dead_count": 0, "dead": [], "pause_reason": None},
            }
        ],
        "reset_guard": {
            "holds": [
                {"server": "home", "user": "carol", "items": 40, "known": 42, "resolution": None},
                {"server": "home", "user": "dave", "items": 9, "known": 9, "resolution": "accept"},
            ],
            "triggers": [
                {
                    "server": "home",
                    "user": "erin",
                    "items": 7,
                    "known": 7,
                    "at_ms": 5,
                    "action": "restored",
                },
            ],
        },
    }
    found = {i.key: i for i in find_incidents(snap, config)}
    assert set(found) == {
        "auth_failed:home:alice",
        "reset_guard:home:carol",
        "reset_guard:home:erin:restored:5",
    }
    assert "token refused" in found["auth_failed:home:alice"].message
    assert found["reset_guard:home:erin:restored:5"].single
    assert found["reset_guard:home:carol"].after_s == 0
    only_dead = AlertsConfig(events=["dead_rows"])
    assert find_incidents(snap, only_dead) == []


CONFIG = """
servers:
  - {name: a, url: "http://127.0.0.1:8096", api_key: key-a-123456}
  - {name: b, url: "http://127.0.0.1:8196", api_key: key-b-123456}
alerts:
  peer_down_after: 2m
  targets:
"""


def _config_problems(targets: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG + targets, base_dir=tmp_path, environ={})
    return info.value.problems


def test_alert_targets_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "gotify.token").write_text("AppTokenFromFile1\n")
    config = parse_config(
        CONFIG
        + "    - {kind: gotify, url: 'https://push.example.org', token_file: ./gotify.token}\n"
        + "    - {kind: ntfy, url: 'https://ntfy.sh/secret-topic-77', name: phone}\n",
        base_dir=tmp_path,
        environ={},
    )
    assert config.alerts.peer_down_after == 120
    gotify, ntfy = config.alerts.targets
    assert gotify.token is not None
    assert gotify.token.get_secret_value() == "AppTokenFromFile1"
    assert gotify.label == "gotify push.example.org"
    assert ntfy.label == "phone"
    # Tokens and URLs are scrubbed from logs and answers like every other secret.
    secrets = config.secret_values()
    assert "AppTokenFromFile1" in secrets
    assert "https://ntfy.sh/secret-topic-77" in secrets
    assert "AppTokenFromFile1" not in repr(config)

    [problem] = _config_problems(
        "    - {kind: gotify, url: 'https://push.example.org'}\n", tmp_path
    )
    assert "alerts.targets[0]" in problem
    assert "application token" in problem
    [problem] = _config_problems("    - {kind: slack, url: 'https://x.example'}\n", tmp_path)
    assert "alerts.targets[0].kind" in problem
    [problem] = _config_problems("    - {kind: webhook, url: 'ftp://x.example'}\n", tmp_path)
    assert "alerts.targets[0].url" in problem
