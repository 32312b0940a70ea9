"""The status server against a running service and two emulators: /status, /healthz, /metrics."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from jfsync.model import UserData
from jfsync.ops.status import _without_userinfo
from tests.operate.conftest import KEYS, Stack, StackFactory
from tests.operate.docs_tables import metric_rows, status_keys

pytestmark = pytest.mark.timeout(30)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    assert isinstance(value, dict), value
    return "object"


def _flatten(snapshot: dict[str, Any], servers: set[str]) -> dict[str, list[Any]]:
    """Every key path (``a[].b``; a server's name as ``<server>``) with every value there."""
    found: dict[str, list[Any]] = defaultdict(list)

    def walk(value: Any, path: str) -> None:
        if path:
            found[path].append(value)
        if isinstance(value, dict):
            for key, inner in value.items():
                name = "<server>" if key in servers else key
                walk(inner, f"{path}.{name}" if path else name)
        elif isinstance(value, list):
            for inner in value:
                walk(inner, f"{path}[]")

    walk(snapshot, "")
    return found


def _check_shape(snapshot: dict[str, Any], servers: set[str]) -> None:
    """Compare ``snapshot`` with docs/status.md both ways: keys, presence and JSON types.

    A documented key must be in every object found at its parent path (an object inside an
    empty array or a null parent has nothing to check); ``<server>`` stands for every server.
    """
    found = _flatten(snapshot, servers)
    documented = status_keys()
    for path, types in documented.items():
        parent, _, key = path.rpartition(".")
        if path.endswith("[]"):
            parent, key = path, ""
        containers = [snapshot] if not parent else found.get(parent, [])
        for container in containers:
            if not isinstance(container, dict) or not key:
                continue
            wanted = servers if key == "<server>" else {key}
            missing = wanted - set(container)
            assert not missing, f"documented key {path} missing from /status ({container!r})"
        for value in found.get(path, []):
            kind = _json_type(value)
            ok = kind in types or (kind == "integer" and "number" in types)
            assert ok, f"{path} is {kind} ({value!r}); docs/status.md says {'|'.join(types)}"
    undocumented = [
        path
        for path, values in found.items()
        if path not in documented and not (path.endswith("[]") and isinstance(values[0], dict))
    ]
    assert not undocumented, f"keys in /status missing from docs/status.md: {undocumented}"


async def _dead_row_on_cabin(stack: Stack) -> str:
    """Make cabin refuse one write with 404 and wait until it is parked; return the item."""
    item = stack.items[1]
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, item, is_favorite=True)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)
    return item


async def _scrape(stack: Stack) -> dict[str, list[Sample]]:
    status, text = await stack.get("/metrics")
    assert status == 200, text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    family = family.removesuffix("_bucket")
    matching = [
        s.value
        for s in families[family]
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, (sample, labels, families[family])
    return matching[0]


async def test_status_json_has_every_documented_key_with_its_type(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.flow(stack.home, stack.items[0], played=True, play_count=1)
    dead_item = await _dead_row_on_cabin(stack)

    status, text = await stack.get("/status")

    assert status == 200, text
    snapshot = json.loads(text)
    _check_shape(snapshot, {"home", "cabin"})
    # The check itself fails on a missing key, an undocumented key and a wrong type.
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda snap: snap["servers"][1]["outbox"].pop("depth"),
        lambda snap: snap["servers"][0]["users"][0].update(token_source="x"),
        lambda snap: snap.update(uptime_s="long"),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(snapshot)
        mutate(broken)
        with pytest.raises(AssertionError):
            _check_shape(broken, {"home", "cabin"})
    # The values say what happened.
    by_name = {s["name"]: s for s in snapshot["servers"]}
    assert [s["name"] for s in snapshot["servers"]] == ["home", "cabin"]
    assert all(s["reachable"] and s["version"] for s in snapshot["servers"])
    assert {u["state"] for s in snapshot["servers"] for u in s["users"]} == {"connected"}
    assert by_name["cabin"]["outbox"]["writes_done"] >= 1
    [dead] = by_name["cabin"]["outbox"]["dead"]
    assert dead["item"] == dead_item
    assert "404" in dead["reason"]
    assert snapshot["counters"]["changes_applied"] >= 2
    assert snapshot["identity"]["pairs"][0]["servers"] == ["home", "cabin"]
    assert snapshot["ledger"]["size_bytes"] > 0
    assert snapshot["ledger"]["index_path"] == f"{snapshot['ledger']['path']}.index"
    assert snapshot["ledger"]["index_size_bytes"] > 0


async def test_healthz_is_200_until_the_ledger_cannot_take_a_write(
    make_stack: StackFactory,
) -> None:
    # Connected first: the ledger is closed under a service that has finished starting.
    stack = await make_stack()
    status, text = await stack.get("/healthz")
    assert (status, json.loads(text)) == (200, {"status": "ok"})
    # The probe leaves nothing behind in the ledger.
    assert await stack.service.ledger.load_token("jfsync-healthz", "probe") is None

    ledger = stack.service.ledger
    await ledger.close()
    try:
        status, text = await stack.get("/healthz")
        assert status == 503
        body = json.loads(text)
        assert body["status"] == "unhealthy"
        assert "not open" in body["reason"]
        status, text = await stack.get("/status")
        assert status == 503
        assert "status unavailable" in text
        status, text = await stack.get("/metrics")
        assert status == 503
    finally:
        await ledger.open()
    status, _ = await stack.get("/healthz")
    assert status == 200


@pytest.mark.parametrize("path", ["/status", "/healthz", "/metrics", "/no-such-route"])
async def test_bearer_token_is_enforced_on_every_route(make_stack: StackFactory, path: str) -> None:
    token = "status-token-7d1f9c2b"
    stack = await make_stack(token=token, connect=False)

    for wrong in (False, "status-token-wrong", token[:-1], token + "x"):
        status, text = await stack.get(path, token=wrong)
        assert status == 401, (wrong, status)
        assert token not in text
    async with stack.http.get(
        stack.url + path, headers={"Authorization": f"Basic {token}"}
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")

    status, text = await stack.get(path)
    assert status == (404 if path == "/no-such-route" else 200), text
    assert token not in text


async def test_status_without_a_token_configured_needs_no_header(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(connect=False)
    status, _ = await stack.get("/status", token="anything")
    assert status == 200
    status, _ = await stack.get("/status", token=False)
    assert status == 200


async def test_metrics_has_every_documented_series_and_they_move(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    before = await _scrape(stack)
    documented = metric_rows()
    # Series that only exist once something is known: give them a value to expose.
    stack.service.last_reconcile_ms = 1_700_000_000_000
    stack.service.last_reconcile_result = "2 users, 0 changes"
    stack.service.identity.status = lambda: {  # type: ignore[method-assign]
        "pairs": [{"servers": ["home", "cabin"], "matched": 18, "unmatched": 2, "ambiguous": 1}]
    }
    families = await _scrape(stack)
    ours = {name for name in families if name.startswith("jfsync_")}
    names = {name.removesuffix("_total") for name in documented}
    assert ours == names, f"undocumented: {ours - names}; missing: {names - ours}"
    for name, (kind, labels) in documented.items():
        samples = families[name.removesuffix("_total")]
        assert samples, f"{name} has no samples"
        for sample in samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)
            assert not sample.name.endswith("_created"), "no _created series: they confuse rate()"
        suffixes = {s.name.removeprefix(name) for s in samples}
        if kind == "histogram":
            assert {"_bucket", "_sum", "_count"} <= suffixes, name
    assert _value(families, "jfsync_identity_items", pair="home+cabin", result="ambiguous") == 1
    assert _value(families, "jfsync_last_reconcile_timestamp_seconds") == 1_700_000_000
    for server in ("home", "cabin"):
        for user in ("alice", "bob"):
            assert (
                _value(families, "jfsync_socket_state", server=server, user=user, state="connected")
                == 1
            )
            assert (
                _value(families, "jfsync_socket_state", server=server, user=user, state="backoff")
                == 0
            )

    # A change flows home -> cabin: counters, writes and the latency histogram move.
    await stack.flow(stack.home, stack.items[0], is_favorite=True)
    after = await _scrape(stack)
    for counter in ("jfsync_events_received_total", "jfsync_changes_applied_total"):
        assert _value(after, counter) > _value(before, counter), counter
    done = {"peer": "cabin", "outcome": "done"}
    assert (
        _value(after, "jfsync_writes_total", **done)
        == _value(before, "jfsync_writes_total", **done) + 1
    )
    count = "jfsync_propagation_latency_seconds_count"
    assert _value(after, count, peer="cabin") == _value(before, count, peer="cabin") + 1
    assert _value(after, count, peer="home") == _value(before, count, peer="home")

    # Cabin goes away: its sockets leave "connected", a change queues, the peer is down.
    await stack.cabin.stop_listener()
    stack.change(stack.home, stack.items[2], rating=7.0)

    async def queued_and_down() -> bool:
        snap = await stack.service.status()
        outbox = snap["servers"][1]["outbox"]
        return outbox["depth"] == 1 and outbox["down_since_ms"] is not None

    await stack.wait_for(queued_and_down)
    down = await _scrape(stack)
    assert _value(down, "jfsync_outbox_depth", peer="cabin") == 1
    assert _value(down, "jfsync_outbox_oldest_age_seconds", peer="cabin") >= 0
    assert _value(down, "jfsync_peer_down", peer="cabin") == 1
    assert _value(down, "jfsync_socket_state", server="cabin", user="alice", state="connected") == 0
    assert _value(down, "jfsync_server_reachable", server="home") == 1
    assert _value(down, "jfsync_server_reachable", server="cabin") == 0

    # Cabin returns: the row drains and the peer is up again.
    await stack.cabin.start_listener()
    await stack.wait_for(lambda: stack.user_data(stack.cabin, stack.items[2]).rating == 7.0)
    await stack.wait_connected()

    async def drained() -> bool:
        snap = await stack.service.status()
        outbox = snap["servers"][1]["outbox"]
        return outbox["depth"] == 0 and outbox["down_since_ms"] is None

    await stack.wait_for(drained)
    back = await _scrape(stack)
    assert _value(back, "jfsync_outbox_depth", peer="cabin") == 0
    assert _value(back, "jfsync_outbox_oldest_age_seconds", peer="cabin") == 0
    assert _value(back, "jfsync_peer_down", peer="cabin") == 0
    assert _value(back, "jfsync_server_reachable", server="cabin") == 1
    assert _value(back, "jfsync_socket_reconnects_total", server="cabin", user="alice") >= 1
    assert (
        _value(back, "jfsync_writes_total", peer="cabin", outcome="done")
        == _value(after, "jfsync_writes_total", peer="cabin", outcome="done") + 1
    )


async def test_paused_peer_and_dead_rows_show_in_metrics(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await _dead_row_on_cabin(stack)
    stack.home.fail_next_writes(1, 401)
    stack.change(stack.cabin, stack.items[3], is_favorite=True)

    async def paused() -> bool:
        snap = await stack.service.status()
        return snap["servers"][0]["outbox"]["pause_reason"] is not None

    await stack.wait_for(paused)
    families = await _scrape(stack)
    assert _value(families, "jfsync_peer_paused", peer="home") == 1
    assert _value(families, "jfsync_peer_paused", peer="cabin") == 0
    assert _value(families, "jfsync_outbox_dead_rows", peer="cabin") == 1
    assert _value(families, "jfsync_writes_total", peer="cabin", outcome="dead") == 1
    assert _value(families, "jfsync_writes_total", peer="home", outcome="failed") == 1


async def test_secrets_that_reach_a_snapshot_are_masked(make_stack: StackFactory) -> None:
    """A second line of defence: a secret inside an error text is replaced in every answer."""
    stack = await make_stack()  # servers up: nothing resets last_error meanwhile
    key = KEYS["home"]
    stack.service.links["home"].last_error = f"proxy said: bad key {key}"
    stack.service.links["cabin"].pusher.stats.last_error = f"echoed {KEYS['cabin']} back"

    status, text = await stack.get("/status")
    assert status == 200
    servers = json.loads(text)["servers"]
    assert servers[0]["last_error"] == "proxy said: bad key ***"
    assert servers[1]["outbox"]["last_error"] == "echoed *** back"
    assert _without_userinfo("https://jf:pw@example.org:8920/jf") == "https://example.org:8920/jf"
    assert _without_userinfo("http://127.0.0.1:8096") == "http://127.0.0.1:8096"


async def test_a_secret_that_json_escapes_is_masked_and_other_text_kept(
    make_stack: StackFactory,
) -> None:
    """The status is encoded once and walked only when something in it needs scrubbing: a
    secret holding characters JSON escapes is found all the same, and a body with nothing to
    scrub (an address with ``@`` in an error, a changed count) comes back as it is, current."""
    token = 'tok"en\\with/quotes'
    stack = await make_stack(token=token)
    stack.service.links["home"].last_error = f"proxy said: bad token {token}"
    status, text = await stack.get("/status")
    assert status == 200
    assert token not in text
    assert json.dumps(token)[1:-1] not in text
    assert json.loads(text)["servers"][0]["last_error"] == "proxy said: bad token ***"

    stack.service.links["home"].last_error = "ask admin@example.org"
    status, text = await stack.get("/status")
    assert json.loads(text)["servers"][0]["last_error"] == "ask admin@example.org"
    stack.service.links["home"].last_error = None
    before = json.loads((await stack.get("/status"))[1])["counters"]["events_received"]
    stack.change(stack.home, stack.items[2], is_favorite=True)
    await stack.wait_for(lambda: stack.holds(stack.cabin, stack.items[2], UserData(favorite=True)))
    after = json.loads((await stack.get("/status"))[1])
    assert after["counters"]["events_received"] > before
    assert after["servers"][0]["last_error"] is None
