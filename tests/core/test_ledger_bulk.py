"""The bulk apply path gives exactly what applying each observation on its own gives.

``Batch.apply_all`` runs the usual shapes of a bulk message or scan page inline (a known server's
change, the first state anyone showed of an item) and sends everything else through the general
per-observation path. A reference ledger whose batches apply every observation through that
general path (``Batch.apply``) is given the same random history as a real ledger: mixed sources
(events, scans, compare reads, reads with old and fresh tickets), bulk actions (one state for
every item, as a "mark all played"), writes acked (so pending echoes exist), indexed servers that
lack items, and policies with per-person choices, send-only and
receive-only servers, the seed policy and rewatch protection. After every step both report the
same outcomes, and in the end their files hold the same rows in every table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jfsync.model import ALL_REGISTERS, PlayState, Register, UserData, user_data
from jfsync.sync.ledger import Applied, ItemMapping, Ledger, Observation
from jfsync.sync.ledger import batch as batch_module
from jfsync.sync.ledger import writer as writer_module
from jfsync.sync.ledger.batch import Batch
from jfsync.sync.ledger.codec import Key, Pair, fetch
from jfsync.sync.ledger.store import BULK_UNCHECKED_MIN
from jfsync.sync.ledger.writer import StateWriter
from jfsync.sync.merge import MergePolicy

SERVERS = ("a", "b", "c")
USERS = ("alice", "bob")
ITEMS = ("i1", "i2", "i3", "i4")
T0 = 1_750_000_000_000


class _EachBatch(Batch):
    """A batch that applies every observation through the general path."""

    def apply_all(
        self,
        observations: Sequence[Observation],
        keys: Sequence[Key],
        pairs: Sequence[Pair] | None = None,
    ) -> list[Applied]:
        return [self.apply(o, k) for o, k in zip(observations, keys, strict=True)]


class ReferenceLedger(Ledger):
    """The ledger with every observation applied one by one by :meth:`Batch.apply`."""

    def _batch(self, tables: StateWriter) -> Batch:
        return _EachBatch(self._policy, self._maps, self._clock, tables)


PLAY_STATES = [
    PlayState(),
    PlayState(True, 1, 1_700_000_000, 0),
    PlayState(False, 2, 1_700_000_500, 7_000),  # a rewatch of the one above
    PlayState(False, 0, None, 0),
    PlayState(True, 3, 1_700_000_900, 0),
]


@st.composite
def states(draw: st.DrawFn) -> UserData:
    """A state, shared (interned, as decoders give) or a fresh object of an equal value."""
    favorite = draw(st.booleans())
    rating = draw(st.sampled_from([None, 5.0, 7.5]))
    play = draw(st.sampled_from(PLAY_STATES))
    if draw(st.booleans()):
        return user_data(
            favorite, rating, play.played, play.play_count, play.last_played_s, play.position_ticks
        )
    return UserData(favorite, rating, PlayState(*_fields(play)))


def _fields(play: PlayState) -> tuple[bool, int, int | None, int]:
    return play.played, play.play_count, play.last_played_s, play.position_ticks


observation = st.tuples(
    st.sampled_from(SERVERS),
    st.sampled_from(USERS),
    st.sampled_from(ITEMS),
    states(),
    st.sampled_from(["event", "event", "event", "scan", "compare", "read"]),
    st.sampled_from(["none", "fresh", "early"]),
    st.integers(min_value=-3_000, max_value=5_000),  # wall clock step (it may go back)
)
#: A bulk action: one state for every item, from one server (a "mark all played").
bulk = st.tuples(
    st.just("bulk"),
    st.sampled_from(SERVERS),
    st.sampled_from(USERS),
    states(),
    st.sampled_from(["event", "scan"]),
    st.integers(min_value=0, max_value=3),
)
step = st.one_of(
    st.tuples(st.just("apply"), st.lists(observation, min_size=1, max_size=12)),
    bulk,
    st.tuples(st.just("ack"), st.sampled_from(SERVERS), st.integers(1, 6)),
    st.tuples(st.just("compare"), st.sampled_from(SERVERS), st.integers(1, 6)),
    st.tuples(st.just("index"), st.sampled_from(SERVERS), st.sets(st.sampled_from(ITEMS))),
)


@st.composite
def policies(draw: st.DrawFn) -> MergePolicy:
    """A policy as a config may give: modes, fields, per-person choices, seed, rewatch."""
    modes = draw(st.lists(st.sampled_from(["both", "both", "send", "receive"]), min_size=3))
    seed = draw(st.sampled_from([None, *SERVERS]))
    policy = MergePolicy(
        servers=SERVERS,
        synced=draw(st.frozensets(st.sampled_from(ALL_REGISTERS), min_size=1)),
        initial_merge="seed" if seed is not None else "merge",
        seed_server=seed,
        rewatch_protection=draw(st.booleans()),
        send_only=frozenset(s for s, m in zip(SERVERS, modes, strict=False) if m == "send"),
        receive_only=frozenset(s for s, m in zip(SERVERS, modes, strict=False) if m == "receive"),
    )
    choices: dict[str, frozenset[Register]] = draw(
        st.dictionaries(
            st.sampled_from(USERS), st.frozensets(st.sampled_from(ALL_REGISTERS)), max_size=1
        )
    )
    return policy.with_user_fields(choices) if choices else policy


class Run:
    """One ledger and the history played on it."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.now = T0
        self.early = 0

    async def start(self, policy: MergePolicy) -> None:
        await self.ledger.set_policy(policy)  # as the service does: choices by user id
        for server in SERVERS:
            for user in USERS:
                await self.ledger.map_user(server, f"{server}-{user}", user)
        self.early = self.ledger.ticket()

    async def play(self, action: tuple[Any, ...]) -> list[object]:
        """Play one step; return what the ledger answered."""
        ledger = self.ledger
        kind = action[0]
        if kind == "apply":
            batch = []
            for server, user, item, state, source, ticket, step_ms in action[1]:
                self.now += step_ms
                seq = {"none": None, "fresh": ledger.ticket(), "early": self.early}[ticket]
                batch.append(Observation(server, user, item, state, self.now, source, seq))
            return list(await ledger.apply_observations(batch))
        if kind == "bulk":
            _, server, user, state, source, repeat = action
            self.now += 1_000
            batch = [
                Observation(server, user, item, state, self.now, source)
                for _ in range(repeat + 1)
                for item in ITEMS
            ]
            return list(await ledger.apply_observations(batch))
        self.now += 1_000
        if kind == "index":
            mappings = [ItemMapping(f"{action[1]}-{item}", item) for item in sorted(action[2])]
            if mappings:
                await ledger.map_items(action[1], mappings)
            return []
        rows = await ledger.due_rows(action[1], action[2], self.now)
        if kind == "ack":
            acks = [(row, row.intended(UserData())) for row in rows]
            return list(await ledger.rows_written(acks, self.now))
        reads = [(row, UserData(favorite=True)) for row in rows]
        return list(await ledger.observe_before_writes(reads, self.now))


async def dump(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables the apply writes, in order (read on the ledger's thread)."""

    def read(tx: StateWriter) -> dict[str, list[tuple[Any, ...]]]:
        return {
            table: sorted(tx.db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in ("canonical", "last_known", "pending_echo", "outbox", "meta")
        }

    return await ledger._read(read)


async def compare(policy: MergePolicy, history: list[tuple[Any, ...]]) -> None:
    """Play ``history`` on both ledgers; the bulk path numbers rows as it makes them even in
    the small messages played here."""
    with mock.patch.object(batch_module, "EARLY_NUMBERING_MIN", 0):
        await _compare(policy, history)


async def _compare(policy: MergePolicy, history: list[tuple[Any, ...]]) -> None:
    async with (
        Ledger(":memory:", policy) as fast,
        ReferenceLedger(":memory:", policy) as reference,
    ):
        runs = Run(fast), Run(reference)
        for run in runs:
            await run.start(policy)
        for action in history:
            got, want = [await run.play(action) for run in runs]
            assert got == want, action
        assert await dump(fast) == await dump(reference)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.lists(step, min_size=1, max_size=25))
async def test_bulk_apply_is_the_per_observation_apply(
    policy: MergePolicy, history: list[tuple[Any, ...]]
) -> None:
    await compare(policy, history)


async def test_a_bulk_message_queues_every_item_for_the_peer() -> None:
    """The shape of a "mark all played": 500 items on a, first ever, then changed again."""
    policy = MergePolicy(servers=("a", "b"))
    items = [f"item{i:03}" for i in range(500)]
    async with Ledger(":memory:", policy) as ledger:
        for server in ("a", "b"):
            await ledger.map_user(server, f"{server}-alice", "alice")
        for round_, count in enumerate((1, 2)):
            state = UserData(play_state=PlayState(True, count, 1_700_000_000 + round_, 0))
            applied = await ledger.apply_observations(
                [Observation("a", "alice", item, state, T0 + round_) for item in items]
            )
            assert {a.outcome.value for a in applied} == {"changed"}
            assert all(a.queued == {"b": frozenset({Register.PLAY_STATE})} for a in applied)
            rows = await ledger.due_rows("b", 1_000, T0 + 10**6)
            assert sorted(r.item for r in rows) == items
            assert {r.desired for r in rows} == {state}
            for item in items[:3]:
                canonical = await ledger.canonical("alice", item)
                assert canonical is not None
                assert canonical.data == state
        assert await ledger.check_invariants() == []


async def test_a_bulk_message_over_items_the_others_changed_moves_only_what_differs() -> None:
    """One state for four items whose canonical states differ: b played two of them since a's
    last bulk action. a's new action moves (and owes b) only the items b does not hold."""
    policy = MergePolicy(servers=("a", "b"))
    items = ["i1", "i2", "i3", "i4"]
    unplayed = UserData()
    played = UserData(play_state=PlayState(True, 1, 1_700_000_000, 0))
    async with Ledger(":memory:", policy) as ledger:
        for server in ("a", "b"):
            await ledger.map_user(server, f"{server}-alice", "alice")
        await ledger.apply_observations([Observation("a", "alice", i, unplayed, T0) for i in items])
        await ledger.apply_observations([Observation("b", "alice", i, unplayed, T0) for i in items])
        for item in ("i2", "i4"):  # the user plays two of them on b
            await ledger.apply_observation("b", "alice", item, played, T0 + 1_000)
        applied = await ledger.apply_observations(
            [Observation("a", "alice", i, played, T0 + 2_000) for i in items]
        )
        moved = {a.observation.item: a.canonical_changed for a in applied}
        assert moved == {
            "i1": frozenset({Register.PLAY_STATE}),
            "i2": frozenset(),
            "i3": frozenset({Register.PLAY_STATE}),
            "i4": frozenset(),
        }
        rows = await ledger.due_rows("b", 10, T0 + 10**6)
        assert sorted(r.item for r in rows) == ["i1", "i3"]


PLAYED = UserData(play_state=PlayState(True, 1, 1_700_000_000, 0))
FAVORITE = UserData(favorite=True)
BOTH = UserData(favorite=True, play_state=PLAYED.play_state)


def _event(item: str, state: UserData, server: str = "a") -> tuple[Any, ...]:
    return (server, "alice", item, state, "event", "none", 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "history",
    [
        # Items known in one order, then changed in the reverse order: the new rows are made
        # out of key order (numbered again at flush, as the per-observation apply numbers them).
        [
            ("bulk", "a", "alice", UserData(), "event", 0),
            ("ack", "b", 100),
            ("ack", "c", 100),
            ("apply", [_event(item, PLAYED) for item in reversed(ITEMS)]),
        ],
        # A row made, then dropped by the change back in the same message (the peers hold
        # that state), then others made.
        [
            ("apply", [_event(item, FAVORITE) for item in ITEMS]),
            ("ack", "b", 100),
            ("ack", "c", 100),
            ("apply", [_event("i1", BOTH), _event("i1", FAVORITE), _event("i2", BOTH)]),
        ],
        # Rows made by the general path (b's change, with an echo pending there) of an item
        # before the bulk path's new rows in key order.
        [
            ("apply", [_event(item, FAVORITE) for item in ITEMS]),
            ("ack", "b", 100),
            ("apply", [_event("i2", BOTH), _event("i1", PLAYED, "b"), _event("i4", BOTH)]),
        ],
    ],
    ids=["reverse-key-order", "made-then-dropped", "general-path-between"],
)
async def test_rows_numbered_as_the_per_observation_apply_numbers_them(
    history: list[tuple[Any, ...]],
) -> None:
    """Outbox row ids (the order rows of one creation time are written in) are the same
    whether the bulk path numbers its rows as it makes them or at the end."""
    await compare(MergePolicy(servers=SERVERS), history)


async def _foreign_keys_on(ledger: Ledger) -> bool:
    """Whether SQLite checks foreign keys on the ledger's connection now (between
    transactions)."""
    return bool(await ledger._read(lambda tx: fetch(tx.db, "PRAGMA foreign_keys")[0][0]))


async def test_foreign_keys_are_checked_again_after_a_bulk_apply(tmp_path: Path) -> None:
    """A bulk message's rows are written without SQLite's foreign-key checks (every id in them
    is the transaction's own): the transactions after it are checked again, also after a bulk
    apply that failed half-way (rolled back whole), and the file passes the check."""
    items = [f"item{i:03}" for i in range(BULK_UNCHECKED_MIN)]
    played = UserData(play_state=PlayState(True, 1, 1_700_000_000, 0))
    async with Ledger(tmp_path / "ledger.db", MergePolicy(servers=("a", "b"))) as ledger:
        for server in ("a", "b"):
            await ledger.map_user(server, f"{server}-alice", "alice")
        assert await _foreign_keys_on(ledger)
        with (
            mock.patch.object(Batch, "flush", side_effect=RuntimeError("disk gone")),
            pytest.raises(RuntimeError, match="disk gone"),
        ):
            await ledger.apply_observations(
                [Observation("a", "alice", item, played, T0) for item in items]
            )
        assert await _foreign_keys_on(ledger)
        assert await ledger.canonical("alice", items[0]) is None  # nothing of it stayed
        applied = await ledger.apply_observations(
            [Observation("a", "alice", item, played, T0) for item in items]
        )
        assert {a.outcome.value for a in applied} == {"changed"}
        assert await _foreign_keys_on(ledger)
        assert len(await ledger.due_rows("b", 1_000, T0 + 10**6)) == len(items)
        assert await ledger.check_invariants() == []


async def _bulk_history(ledger: Ledger) -> list[dict[str, list[tuple[Any, ...]]]]:
    """Bulk messages of every shape the writer binds shared values for, and of none; what the
    file holds after each."""
    items = [f"item{i:03}" for i in range(130)]  # two whole statements and some
    watched = [
        UserData(play_state=PlayState(True, count, 1_700_000_000 + count, 0)) for count in (1, 2)
    ]
    for server in SERVERS:
        await ledger.map_user(server, f"{server}-alice", "alice")
    files = []
    now = T0
    # A first state on a (three registers decided at once), then a new play state on b (the
    # play state decided apart, by another server): one state for every item.
    for server, state in zip("ab", watched, strict=True):
        now += 1_000
        await ledger.apply_observations(
            [Observation(server, "alice", i, state, now) for i in items]
        )
        files.append(await dump(ledger))
        rows = await ledger.due_rows("b", 1_000, now + 10**6)
        await ledger.rows_written([(row, row.desired) for row in rows], now)
        files.append(await dump(ledger))
    now += 1_000
    favorite = UserData(favorite=True, play_state=watched[1].play_state)
    mixed = [Observation("b", "alice", i, favorite, now) for i in items[:70]]  # favorites
    mixed += [  # every other item its own state
        Observation("c", "alice", i, watched[n % 2], now) for n, i in enumerate(items[70:])
    ]
    await ledger.apply_observations(mixed)
    files.append(await dump(ledger))
    return files


async def test_rows_sharing_values_are_written_as_each_row_alone(tmp_path: Path) -> None:
    """A bulk message's rows are written in statements that bind the values they share once:
    the file then holds exactly what writing every row with all its values gives."""
    policy = MergePolicy(servers=SERVERS)
    async with Ledger(tmp_path / "shared.db", policy) as shared:
        got = await _bulk_history(shared)
        assert await shared.check_invariants() == []
    with mock.patch.object(writer_module, "RUN_MIN", 10**9):  # every row alone
        async with Ledger(tmp_path / "alone.db", policy) as alone:
            want = await _bulk_history(alone)
    for step, (file, expected) in enumerate(zip(got, want, strict=True)):
        assert file == expected, step
    assert len(got[0]["canonical"]) == 130
