"""The pure merge: table-driven rules for known servers and first contact, and properties."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jfsync.sync.merge as merge_module
from jfsync.model import ALL_REGISTERS, DEFAULT_USER_DATA, PlayState, Register, Stamp, UserData
from jfsync.sync.merge import (
    CanonicalState,
    MergePolicy,
    MergeResult,
    Stamped,
    changed_registers,
    first_contact_winner,
    merge,
    next_stamp_ms,
)
from jfsync.sync.rewatch import protected

FAV = Register.FAVORITE
RAT = Register.RATING
PS = Register.PLAY_STATE
SERVERS = ("a", "b", "c")
POLICY = MergePolicy(servers=SERVERS)


def st_(ms: int, server: str, policy: MergePolicy = POLICY) -> Stamp:
    return policy.stamp(ms, server)


def canon(
    data: UserData, ms: int = 100, origin: str = "a", **per: tuple[int, str]
) -> CanonicalState:
    """A canonical state stamped ``ms`` by ``origin``, with per-register overrides."""
    state = CanonicalState.first(data, st_(ms, origin), origin)
    for name, (rms, rorigin) in per.items():
        register = Register(name)
        state = state.with_register(
            register, data.get(register), Stamped(st_(rms, rorigin), rorigin)
        )
    return state


PLAYED_OLD = PlayState(played=True, play_count=1, last_played_s=1_000, position_ticks=0)
PLAYED_NEW = PlayState(played=True, play_count=2, last_played_s=2_000, position_ticks=0)
RESUME_NEW = PlayState(played=False, play_count=1, last_played_s=2_000, position_ticks=5_000)
PLAYED_NO_DATE = PlayState(played=True, play_count=1, last_played_s=None, position_ticks=0)


# ---------------------------------------------------------------------- known server


@dataclass(frozen=True)
class KnownCase:
    name: str
    canonical: CanonicalState
    last_known: UserData
    incoming: UserData
    stamp: Stamp
    origin: str
    changed: set[Register]
    expect: UserData
    writes: dict[str, set[Register]]
    synced: frozenset[Register] = frozenset(ALL_REGISTERS)


KNOWN_CASES = [
    KnownCase(
        "favourite on propagates to every other server",
        canon(DEFAULT_USER_DATA),
        DEFAULT_USER_DATA,
        UserData(favorite=True),
        st_(200, "b"),
        "b",
        {FAV},
        UserData(favorite=True),
        {"a": {FAV}, "c": {FAV}},
    ),
    KnownCase(
        "favourite off propagates too",
        canon(UserData(favorite=True)),
        UserData(favorite=True),
        DEFAULT_USER_DATA,
        st_(200, "a"),
        "a",
        {FAV},
        DEFAULT_USER_DATA,
        {"b": {FAV}, "c": {FAV}},
    ),
    KnownCase(
        "only the changed register is a write, the others are left alone",
        canon(UserData(favorite=True, rating=4.0)),
        UserData(favorite=False, rating=4.0),  # b never got the favourite yet
        UserData(favorite=False, rating=8.0),
        st_(200, "b"),
        "b",
        {RAT},
        UserData(favorite=True, rating=8.0),
        {"a": {RAT}, "c": {RAT}},
    ),
    KnownCase(
        "rating cleared",
        canon(UserData(rating=7.0)),
        UserData(rating=7.0),
        DEFAULT_USER_DATA,
        st_(200, "c"),
        "c",
        {RAT},
        DEFAULT_USER_DATA,
        {"a": {RAT}, "b": {RAT}},
    ),
    KnownCase(
        "unplayed moves the whole play state (date cleared)",
        canon(UserData(play_state=PLAYED_NEW)),
        UserData(play_state=PLAYED_NEW),
        DEFAULT_USER_DATA,
        st_(200, "a"),
        "a",
        {PS},
        DEFAULT_USER_DATA,
        {"b": {PS}, "c": {PS}},
    ),
    KnownCase(
        "a stale change loses and the origin is owed the canonical value",
        canon(UserData(favorite=True), ms=500, origin="a"),
        UserData(favorite=True),
        DEFAULT_USER_DATA,
        st_(400, "b"),
        "b",
        {FAV},
        UserData(favorite=True),
        {"b": {FAV}},
    ),
    KnownCase(
        "same millisecond: the earlier server in config order wins",
        canon(UserData(rating=3.0), ms=500, origin="b"),
        UserData(rating=3.0),
        UserData(rating=9.0),
        st_(500, "a"),
        "a",
        {RAT},
        UserData(rating=9.0),
        {"b": {RAT}, "c": {RAT}},
    ),
    KnownCase(
        "same millisecond: the later server in config order loses",
        canon(UserData(rating=3.0), ms=500, origin="a"),
        UserData(rating=3.0),
        UserData(rating=9.0),
        st_(500, "b"),
        "b",
        {RAT},
        UserData(rating=3.0),
        {"b": {RAT}},
    ),
    KnownCase(
        "catching up to the canonical value is a change but owes nothing",
        canon(UserData(favorite=True)),
        DEFAULT_USER_DATA,
        UserData(favorite=True),
        st_(200, "c"),
        "c",
        {FAV},
        UserData(favorite=True),
        {},
    ),
    KnownCase(
        "a register that is not synced is never a change",
        canon(DEFAULT_USER_DATA),
        DEFAULT_USER_DATA,
        UserData(favorite=True, rating=5.0),
        st_(200, "a"),
        "a",
        {RAT},
        UserData(rating=5.0),
        {"b": {RAT}, "c": {RAT}},
        synced=frozenset({RAT, PS}),
    ),
    KnownCase(
        "nothing differs from last-known: nothing happens",
        canon(UserData(favorite=True)),
        UserData(rating=2.0),
        UserData(rating=2.0),
        st_(200, "b"),
        "b",
        set(),
        UserData(favorite=True),
        {},
    ),
]


@pytest.mark.parametrize("case", KNOWN_CASES, ids=lambda c: c.name)
def test_known_server(case: KnownCase) -> None:
    policy = MergePolicy(servers=SERVERS, synced=case.synced)
    result = merge(
        policy,
        canonical=case.canonical,
        last_known=case.last_known,
        incoming=case.incoming,
        stamp=case.stamp,
        origin=case.origin,
    )
    assert not result.first_contact
    assert result.changed == case.changed
    assert result.canonical.data == case.expect
    assert {k: set(v) for k, v in result.writes.items()} == case.writes


def test_winning_change_takes_stamp_and_origin_losing_keeps_them() -> None:
    base = canon(DEFAULT_USER_DATA, ms=100, origin="a")
    won = merge(
        POLICY,
        canonical=base,
        last_known=DEFAULT_USER_DATA,
        incoming=UserData(favorite=True),
        stamp=st_(300, "c"),
        origin="c",
    )
    assert won.canonical.favorite == Stamped(st_(300, "c"), "c")
    assert won.canonical.rating == base.rating  # untouched registers keep their stamps
    lost = merge(
        POLICY,
        canonical=won.canonical,
        last_known=DEFAULT_USER_DATA,
        incoming=UserData(favorite=False, rating=1.0),
        stamp=st_(200, "b"),
        origin="b",
    )
    assert lost.canonical.favorite == Stamped(st_(300, "c"), "c")
    assert lost.canonical.data == UserData(favorite=True, rating=1.0)


# ---------------------------------------------------------------------- first contact


@dataclass(frozen=True)
class FirstCase:
    name: str
    canonical: CanonicalState | None
    incoming: UserData
    origin: str
    expect: UserData
    writes: dict[str, set[Register]]
    policy: MergePolicy = POLICY
    seed_known: bool = False


FIRST_CASES = [
    FirstCase(
        "first ever: the state becomes canonical, non-default registers are owed",
        None,
        UserData(favorite=True, play_state=PLAYED_OLD),
        "b",
        UserData(favorite=True, play_state=PLAYED_OLD),
        {"a": {FAV, PS}, "c": {FAV, PS}},
    ),
    FirstCase(
        "first ever with the default state owes nothing",
        None,
        DEFAULT_USER_DATA,
        "a",
        DEFAULT_USER_DATA,
        {},
    ),
    FirstCase(
        "favourite is OR: a favourite on the new side wins",
        canon(DEFAULT_USER_DATA, origin="a"),
        UserData(favorite=True),
        "c",
        UserData(favorite=True),
        {"a": {FAV}, "b": {FAV}},
    ),
    FirstCase(
        "favourite is OR: a favourite already canonical stays",
        canon(UserData(favorite=True), origin="c"),
        DEFAULT_USER_DATA,
        "a",
        UserData(favorite=True),
        {"a": {FAV}},
    ),
    FirstCase(
        "rating: the non-null one wins over a cleared canonical",
        canon(DEFAULT_USER_DATA, origin="a"),
        UserData(rating=6.0),
        "c",
        UserData(rating=6.0),
        {"a": {RAT}, "b": {RAT}},
    ),
    FirstCase(
        "rating: a null incoming keeps the canonical rating",
        canon(UserData(rating=6.0), origin="c"),
        DEFAULT_USER_DATA,
        "a",
        UserData(rating=6.0),
        {"a": {RAT}},
    ),
    FirstCase(
        "rating: both set, the earlier server in config order wins (incoming earlier)",
        canon(UserData(rating=6.0), origin="c"),
        UserData(rating=2.0),
        "b",
        UserData(rating=2.0),
        {"a": {RAT}, "c": {RAT}},
    ),
    FirstCase(
        "rating: both set, the earlier server in config order wins (canonical earlier)",
        canon(UserData(rating=6.0), origin="a"),
        UserData(rating=2.0),
        "b",
        UserData(rating=6.0),
        {"b": {RAT}},
    ),
    FirstCase(
        "play state: the later last played date wins",
        canon(UserData(play_state=PLAYED_OLD), origin="a"),
        UserData(play_state=RESUME_NEW),
        "b",
        UserData(play_state=RESUME_NEW),
        {"a": {PS}, "c": {PS}},
    ),
    FirstCase(
        "play state: an older date loses",
        canon(UserData(play_state=PLAYED_NEW), origin="b"),
        UserData(play_state=PLAYED_OLD),
        "a",
        UserData(play_state=PLAYED_NEW),
        {"a": {PS}},
    ),
    FirstCase(
        "play state: played beats never played",
        canon(DEFAULT_USER_DATA, origin="a"),
        UserData(play_state=PLAYED_NO_DATE),
        "c",
        UserData(play_state=PLAYED_NO_DATE),
        {"a": {PS}, "b": {PS}},
    ),
    FirstCase(
        "play state: equal dates, played beats not played",
        canon(UserData(play_state=RESUME_NEW), origin="a"),
        UserData(play_state=PlayState(True, 1, 2_000, 0)),
        "b",
        UserData(play_state=PlayState(True, 1, 2_000, 0)),
        {"a": {PS}, "c": {PS}},
    ),
    FirstCase(
        "registers are merged independently at first contact",
        canon(UserData(favorite=True, rating=None, play_state=PLAYED_NEW), origin="a"),
        UserData(favorite=False, rating=4.0, play_state=PLAYED_OLD),
        "b",
        UserData(favorite=True, rating=4.0, play_state=PLAYED_NEW),
        {"a": {RAT}, "c": {RAT}, "b": {FAV, PS}},
    ),
    FirstCase(
        "seed: the seed's first contact wins, even a default state",
        canon(UserData(favorite=True, rating=9.0, play_state=PLAYED_NEW), origin="a"),
        DEFAULT_USER_DATA,
        "b",
        DEFAULT_USER_DATA,
        {"a": {FAV, RAT, PS}, "c": {FAV, RAT, PS}},
        policy=MergePolicy(servers=SERVERS, initial_merge="seed", seed_server="b"),
    ),
    FirstCase(
        "seed: another server meeting a seeded item loses",
        canon(DEFAULT_USER_DATA, origin="a"),
        UserData(favorite=True, rating=9.0),
        "c",
        DEFAULT_USER_DATA,
        {"c": {FAV, RAT}},
        policy=MergePolicy(servers=SERVERS, initial_merge="seed", seed_server="b"),
        seed_known=True,
    ),
    FirstCase(
        "seed: before the seed shows up, the merge rules apply",
        canon(DEFAULT_USER_DATA, origin="a"),
        UserData(favorite=True),
        "c",
        UserData(favorite=True),
        {"a": {FAV}, "b": {FAV}},
        policy=MergePolicy(servers=SERVERS, initial_merge="seed", seed_server="b"),
        seed_known=False,
    ),
]


@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_first_contact(case: FirstCase) -> None:
    result = merge(
        case.policy,
        canonical=case.canonical,
        last_known=None,
        incoming=case.incoming,
        stamp=st_(900, case.origin),
        origin=case.origin,
        seed_known=case.seed_known,
    )
    assert result.first_contact
    assert result.canonical.data == case.expect
    assert {k: set(v) for k, v in result.writes.items()} == case.writes


def test_first_contact_winner_reports_each_register() -> None:
    assert (
        first_contact_winner(
            POLICY, RAT, current=None, current_origin="a", incoming=1.0, origin="c"
        )
        == "incoming"
    )
    assert (
        first_contact_winner(
            POLICY, FAV, current=True, current_origin="c", incoming=False, origin="a"
        )
        == "canonical"
    )


def test_hybrid_clock_step() -> None:
    assert next_stamp_ms(1_000, 500) == 1_000
    assert next_stamp_ms(1_000, 1_000) == 1_001
    assert next_stamp_ms(10, 1_000) == 1_001  # the wall clock jumped back


def test_policy_validation_and_rank() -> None:
    with pytest.raises(ValueError, match="unique"):
        MergePolicy(servers=("a", "a"))
    with pytest.raises(ValueError, match="seed_server"):
        MergePolicy(servers=("a", "b"), initial_merge="seed")
    with pytest.raises(ValueError, match="not one of"):
        MergePolicy(servers=("a", "b"), seed_server="z")
    assert POLICY.rank("c") == 2
    assert POLICY.rank("gone") == 3
    assert POLICY.stamp(5, "a") > POLICY.stamp(5, "b") > POLICY.stamp(4, "a")


# ---------------------------------------------------------------------- properties

play_states = st.builds(
    PlayState,
    played=st.booleans(),
    play_count=st.integers(0, 3),
    last_played_s=st.none() | st.integers(1_000, 1_003),
    position_ticks=st.sampled_from([0, 10_000]),
)
user_data = st.builds(
    UserData,
    favorite=st.booleans(),
    rating=st.none() | st.sampled_from([1.0, 5.5, 10.0]),
    play_state=play_states,
)
servers = st.sampled_from(SERVERS)
register_sets = st.frozensets(st.sampled_from(ALL_REGISTERS), min_size=1)


def _canonical_for(
    data: UserData, origins: tuple[str, str, str], ms: tuple[int, int, int]
) -> CanonicalState:
    state = CanonicalState.first(data, st_(ms[0], origins[0]), origins[0])
    state = state.with_register(RAT, data.rating, Stamped(st_(ms[1], origins[1]), origins[1]))
    return state.with_register(PS, data.play_state, Stamped(st_(ms[2], origins[2]), origins[2]))


canonicals = st.builds(
    _canonical_for,
    user_data,
    st.tuples(servers, servers, servers),
    st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)),
)


@given(user_data, user_data, register_sets)
def test_changed_registers_are_the_synced_ones_whose_value_differs(
    before: UserData, after: UserData, synced: frozenset[Register]
) -> None:
    expected = frozenset(r for r in synced if before.get(r) != after.get(r))
    assert changed_registers(synced, before, after) == expected
    assert changed_registers(synced, before, before) == frozenset()


def _known_server_by_the_rules(
    policy: MergePolicy,
    canonical: CanonicalState,
    last_known: UserData,
    incoming: UserData,
    stamp: Stamp,
    origin: str,
) -> tuple[frozenset[Register], CanonicalState, frozenset[Register], dict[str, set[Register]]]:
    """The known-server rules of the module doc, register by register, written plainly."""
    changed = frozenset(r for r in policy.synced if incoming.get(r) != last_known.get(r))
    new, moved, lost = canonical, set(), set()
    for register in ALL_REGISTERS:
        if register not in changed:
            continue
        value = incoming.get(register)
        if policy.rewatch_protection and register is PS:
            assert isinstance(value, PlayState)
            value = protected(canonical.data.play_state, value)
        if stamp > canonical.stamped(register).stamp:
            if value != canonical.data.get(register):
                moved.add(register)
            new = new.with_register(register, value, Stamped(stamp, origin))
        elif value != canonical.data.get(register):
            lost.add(register)
    writes: dict[str, set[Register]] = {}
    if moved:
        writes.update({s: set(moved) for s in policy.servers if s != origin})
    if lost:
        writes[origin] = set(lost)
    return changed, new, frozenset(moved), writes


@settings(max_examples=400)
@given(
    canonicals,
    user_data,
    user_data,
    servers,
    st.integers(0, 100),
    register_sets,
    st.booleans(),
)
def test_known_server_merge_follows_the_rules_register_by_register(
    canonical: CanonicalState,
    last_known: UserData,
    incoming: UserData,
    origin: str,
    ms: int,
    synced: frozenset[Register],
    rewatch: bool,
) -> None:
    policy = MergePolicy(servers=SERVERS, synced=synced, rewatch_protection=rewatch)
    stamp = st_(ms, origin)
    result = merge(
        policy,
        canonical=canonical,
        last_known=last_known,
        incoming=incoming,
        stamp=stamp,
        origin=origin,
    )
    changed, expected, moved, writes = _known_server_by_the_rules(
        policy, canonical, last_known, incoming, stamp, origin
    )
    assert result.changed == changed
    assert result.canonical == expected
    assert result.canonical_changed == moved
    assert {s: set(r) for s, r in result.writes.items()} == writes
    # Nothing moved: the very state given back (the ledger then writes nothing).
    assert (result.canonical is canonical) == (expected == canonical)


@given(canonicals, st.none() | user_data, user_data, servers, st.integers(0, 100), register_sets)
def test_reapplying_the_same_observation_changes_nothing(
    canonical: CanonicalState,
    last_known: UserData | None,
    incoming: UserData,
    origin: str,
    ms: int,
    synced: frozenset[Register],
) -> None:
    policy = MergePolicy(servers=SERVERS, synced=synced)
    first = merge(
        policy,
        canonical=canonical,
        last_known=last_known,
        incoming=incoming,
        stamp=st_(ms, origin),
        origin=origin,
    )
    again = merge(
        policy,
        canonical=first.canonical,
        last_known=incoming,
        incoming=incoming,
        stamp=st_(ms + 1, origin),
        origin=origin,
    )
    assert again.changed == frozenset()
    assert again.writes == {}
    assert again.canonical == first.canonical


@given(canonicals, user_data, user_data, servers, register_sets)
def test_a_later_stamp_wins_every_changed_register(
    canonical: CanonicalState,
    last_known: UserData,
    incoming: UserData,
    origin: str,
    synced: frozenset[Register],
) -> None:
    policy = MergePolicy(servers=SERVERS, synced=synced)
    result = merge(
        policy,
        canonical=canonical,
        last_known=last_known,
        incoming=incoming,
        stamp=st_(1_000, origin),
        origin=origin,
    )
    for register in ALL_REGISTERS:
        if register in result.changed:
            assert result.canonical.data.get(register) == incoming.get(register)
            assert result.canonical.stamped(register) == Stamped(st_(1_000, origin), origin)
        else:
            assert result.canonical.stamped(register) == canonical.stamped(register)
            assert result.canonical.data.get(register) == canonical.data.get(register)
    assert origin not in result.writes  # a winner is never owed its own value


@given(canonicals, user_data, user_data, servers, st.integers(0, 100), register_sets)
def test_no_writes_for_unchanged_registers(
    canonical: CanonicalState,
    last_known: UserData,
    incoming: UserData,
    origin: str,
    ms: int,
    synced: frozenset[Register],
) -> None:
    policy = MergePolicy(servers=SERVERS, synced=synced)
    result = merge(
        policy,
        canonical=canonical,
        last_known=last_known,
        incoming=incoming,
        stamp=st_(ms, origin),
        origin=origin,
    )
    assert result.changed <= synced
    for owed in result.writes.values():
        assert owed
        assert owed <= result.changed
    for register in ALL_REGISTERS:
        if register not in result.changed:
            assert result.canonical.data.get(register) == canonical.data.get(register)


@given(user_data, user_data, user_data, st.sampled_from(list(itertools.permutations([0, 1]))))
def test_edits_of_different_registers_on_two_servers_both_survive(
    start: UserData, a_state: UserData, b_state: UserData, order: tuple[int, int]
) -> None:
    """a edits the favourite and b edits the rating, observed in either order: both stay."""
    a_new = start.with_register(FAV, not start.favorite)
    b_new = start.with_register(RAT, 3.0 if start.rating != 3.0 else 4.0)
    canonical = CanonicalState.first(start, st_(1, "a"), "a")
    steps = [("a", a_new), ("b", b_new)]
    for index, position in enumerate(order):
        origin, incoming = steps[position]
        canonical = merge(
            POLICY,
            canonical=canonical,
            last_known=start,
            incoming=incoming,
            stamp=st_(10 + index, origin),
            origin=origin,
        ).canonical
    assert canonical.data.favorite == a_new.favorite
    assert canonical.data.rating == b_new.rating


@settings(max_examples=200)
@given(st.lists(st.tuples(servers, user_data), min_size=1, max_size=3, unique_by=lambda t: t[0]))
def test_first_contact_outcome_does_not_depend_on_arrival_order(
    states: list[tuple[str, UserData]],
) -> None:
    outcomes = set()
    for perm in itertools.permutations(states):
        canonical: CanonicalState | None = None
        for ms, (origin, incoming) in enumerate(perm, start=1):
            canonical = merge(
                POLICY,
                canonical=canonical,
                last_known=None,
                incoming=incoming,
                stamp=st_(ms, origin),
                origin=origin,
            ).canonical
        assert canonical is not None
        outcomes.add(canonical.data)
    assert len(outcomes) == 1


@settings(max_examples=200)
@given(st.lists(st.tuples(servers, user_data), min_size=2, max_size=3, unique_by=lambda t: t[0]))
def test_seed_first_contact_wins_whatever_the_order(states: list[tuple[str, UserData]]) -> None:
    seed = states[0][0]
    policy = MergePolicy(servers=SERVERS, initial_merge="seed", seed_server=seed)
    for perm in itertools.permutations(states):
        canonical: CanonicalState | None = None
        seen: set[str] = set()
        for ms, (origin, incoming) in enumerate(perm, start=1):
            canonical = merge(
                policy,
                canonical=canonical,
                last_known=None,
                incoming=incoming,
                stamp=st_(ms, origin),
                origin=origin,
                seed_known=seed in seen,
            ).canonical
            seen.add(origin)
        assert canonical is not None
        assert canonical.data == states[0][1]


# ---------------------------------------------------------------------- a small replica system


class Replicas:
    """Servers, a ledger model and delivery, driven by the pure merge (no I/O)."""

    def __init__(self, policy: MergePolicy, initial: dict[str, UserData]) -> None:
        self.policy = policy
        self.actual = dict(initial)
        self.canonical: CanonicalState | None = None
        self.last_known: dict[str, UserData] = {}
        self.owed: dict[str, set[Register]] = {s: set() for s in policy.servers}
        self.clock = 0
        self.writes = 0

    def observe(self, server: str) -> MergeResult | None:
        incoming = self.actual[server]
        known = self.last_known.get(server)
        if known is not None and all(known.get(r) == incoming.get(r) for r in self.policy.synced):
            self.last_known[server] = incoming
            return None
        self.clock += 1
        seed = self.policy.seed
        result = merge(
            self.policy,
            canonical=self.canonical,
            last_known=known,
            incoming=incoming,
            stamp=self.policy.stamp(self.clock, server),
            origin=server,
            seed_known=seed is not None and seed in self.last_known,
        )
        self.canonical = result.canonical
        self.last_known[server] = incoming
        for target, registers in result.writes.items():
            self.owed[target] |= registers
        self._prune()
        return result

    def deliver(self, server: str) -> None:
        if not self.owed[server]:
            return
        if self.last_known.get(server) != self.actual[server]:
            self.observe(server)  # compare before write
            if not self.owed[server]:
                return
        assert self.canonical is not None
        state = self.actual[server]
        for register in sorted(self.owed[server]):
            state = state.with_register(register, self.canonical.data.get(register))
        self.writes += 1
        self.actual[server] = state
        self.last_known[server] = state
        self.owed[server] = set()

    def _prune(self) -> None:
        assert self.canonical is not None
        for server, owed in self.owed.items():
            known = self.last_known.get(server)
            if known is not None:
                owed -= {r for r in owed if known.get(r) == self.canonical.data.get(r)}

    def settle(self) -> None:
        for _ in range(20):
            for server in self.policy.servers:
                self.observe(server)
            for server in self.policy.servers:
                self.deliver(server)
            if not any(self.owed.values()) and all(
                self.last_known.get(s) == self.actual[s] for s in self.policy.servers
            ):
                return
        raise AssertionError("the replicas never settled")


actions = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), servers, st.sampled_from(ALL_REGISTERS), user_data),
        st.tuples(st.just("observe"), servers),
        st.tuples(st.just("deliver"), servers),
    ),
    max_size=30,
)


@settings(max_examples=300)
@given(st.tuples(user_data, user_data, user_data), actions, register_sets, st.booleans())
def test_replicas_converge_and_stop_writing(
    initial: tuple[UserData, UserData, UserData],
    steps: list[tuple[object, ...]],
    synced: frozenset[Register],
    seeded: bool,
) -> None:
    policy = MergePolicy(
        servers=SERVERS,
        synced=synced,
        initial_merge="seed" if seeded else "merge",
        seed_server="c" if seeded else None,
    )
    replicas = Replicas(policy, dict(zip(SERVERS, initial, strict=True)))
    for step in steps:
        if step[0] == "edit":
            _, server, register, value = step
            assert isinstance(server, str)
            assert isinstance(register, Register)
            assert isinstance(value, UserData)
            replicas.actual[server] = replicas.actual[server].with_register(
                register, value.get(register)
            )
        elif step[0] == "observe":
            replicas.observe(str(step[1]))
        else:
            replicas.deliver(str(step[1]))
    replicas.settle()
    assert replicas.canonical is not None
    for server in SERVERS:
        for register in synced:
            assert replicas.actual[server].get(register) == replicas.canonical.data.get(register)
    # Quiet: observing everything again finds no change and owes no write.
    writes = replicas.writes
    for server in SERVERS:
        assert replicas.observe(server) is None
        replicas.deliver(server)
    assert replicas.writes == writes


@given(user_data, st.sampled_from(ALL_REGISTERS), user_data, user_data, st.booleans())
def test_concurrent_edits_converge_to_the_later_observation(
    start: UserData, register: Register, a_value: UserData, b_value: UserData, a_first: bool
) -> None:
    """a and b edit one register before either is seen; the one observed later wins everywhere."""
    assume(a_value.get(register) != start.get(register))
    assume(b_value.get(register) != start.get(register))
    replicas = Replicas(POLICY, dict.fromkeys(SERVERS, start))
    replicas.settle()
    replicas.actual["a"] = start.with_register(register, a_value.get(register))
    replicas.actual["b"] = start.with_register(register, b_value.get(register))
    first, second = ("a", "b") if a_first else ("b", "a")
    replicas.observe(first)
    replicas.observe(second)
    winner = replicas.actual[second].get(register)
    replicas.settle()
    for server in SERVERS:
        assert replicas.actual[server].get(register) == winner


@given(
    user_data,
    st.tuples(servers, servers, servers),
    st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)),
    user_data,
    servers,
    st.integers(0, 100),
    st.integers(0, 100),
    st.booleans(),
)
def test_a_first_contact_decides_alike_after_the_same_one(
    data: UserData,
    origins: tuple[str, str, str],
    first_ms: tuple[int, int, int],
    second_ms: tuple[int, int, int],
    incoming: UserData,
    origin: str,
    first_stamp: int,
    second_stamp: int,
    seeded: bool,
) -> None:
    """A pusher meets one peer's first contact with a batch of items holding the same values
    (only the stamps differ): each item gets what it would get on its own."""
    policy = (
        MergePolicy(servers=SERVERS, initial_merge="seed", seed_server="b") if seeded else POLICY
    )
    second = _canonical_for(data, origins, second_ms)

    def first_contact(canonical: CanonicalState, ms: int) -> MergeResult:
        return merge(
            policy,
            canonical=canonical,
            last_known=None,
            incoming=incoming,
            stamp=st_(ms, origin, policy),
            origin=origin,
        )

    first_contact(_canonical_for(data, origins, first_ms), first_stamp)
    after_the_same = first_contact(second, second_stamp)
    merge_module._last_first_contact = None  # nothing decided before
    assert after_the_same == first_contact(second, second_stamp)
