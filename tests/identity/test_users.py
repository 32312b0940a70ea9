"""Users across servers, end to end: by name in any case, an explicit map, an exclude list,
and people present on only some servers.

Three servers: a (alice, bob, carol), b (Alice, bob, dave), c (alice). The config excludes bob
and maps carol on a to dave on b. alice syncs everywhere whatever the case of her name;
carol/dave sync between a and b only; bob is never read nor written on any server.
"""

from __future__ import annotations

import pytest

from jfsync.model import UserData
from tests.identity.conftest import MakeStack, emulator

pytestmark = pytest.mark.timeout(40)


async def test_name_map_exclude_and_partial_presence_through_the_service(
    make_stack: MakeStack,
) -> None:
    a = emulator("a", users=[("alice", "x"), ("bob", "x"), ("carol", "x")])
    b = emulator("b", users=[("Alice", "x"), ("bob", "x"), ("dave", "x")])
    c = emulator("c", users=[("alice", "x")])
    stack = await make_stack(
        [a, b, c],
        users={"exclude": ["BOB"], "map": [{"a": "carol", "b": "dave"}]},
    )
    service = stack.svc()
    subscribed = {
        name: sorted(s.user_name for s in link.subscribers.values())
        for name, link in service.links.items()
    }
    assert subscribed == {"a": ["alice", "carol"], "b": ["Alice", "dave"], "c": ["alice"]}

    items = [i.id for i in a.leaf_items()]  # same root and seed: the same ids everywhere
    stack.change("c", items[0], is_favorite=True)
    stack.change("a", items[1], "carol", rating=9.0)
    stack.change("a", items[2], "bob", is_favorite=True)
    stack.change("b", items[2], "bob", rating=2.0)
    await stack.wait(
        lambda: (
            stack.holds("a", items[0], UserData(favorite=True))
            and stack.holds("b", items[0], UserData(favorite=True), "Alice")
            and stack.holds("b", items[1], UserData(rating=9.0), "dave")
        )
    )
    # A full reconcile reads every synced user everywhere; bob is not one of them.
    assert service.reconciler is not None
    await service.reconciler.reconcile()
    assert stack.data("b", items[2], "bob") == UserData(rating=2.0)
    assert stack.data("a", items[2], "bob") == UserData(favorite=True)
    bob_ids = {emu.user_id("bob") for emu in (a, b)}
    assert not [w for emu in (a, b) for w in emu.writes if w.user_id in bob_ids]
    assert not [
        r
        for emu in (a, b)
        for r in emu.requests
        if any(i in r.path or i in str(r.query).lower() for i in bob_ids)
    ]
    # c has no carol: it only ever received alice's writes.
    assert {w.user_id for w in c.writes} <= {c.user_id("alice")}
