"""The merge decision: how one observed user-data state changes the canonical state (pure).

Nothing here does I/O or reads a clock; the ledger feeds it what it stored and writes back what
it returns. One call handles one observation: the state ``incoming`` that server ``origin`` holds
for one (user, item), stamped ``stamp`` by the ledger's hybrid clock (:func:`next_stamp_ms`).

Registers (``favorite``, ``rating``, ``play_state``) are merged independently. Registers not in
:attr:`MergePolicy.synced` are never changes, never move the canonical state and are never
written anywhere.

**Known server** (the ledger holds a last-known state of ``origin`` for this user and item, and a
canonical state exists): the *changes* are the synced registers whose incoming value differs
from the last-known one; unchanged registers are not writes, whatever they hold. Each change is
last-writer-wins on its own register: if ``stamp`` is later than the register's canonical stamp
(``Stamp`` orders by hybrid-clock milliseconds, then by server order, earlier server winning a
tie) the incoming value becomes canonical with that stamp and origin; if the value differs from
the old canonical value every other server is owed that register. A change whose stamp is not
later loses: the canonical value stays, and ``origin`` itself is owed the register when it now
holds something else.

**First contact** (no last-known state of ``origin`` for this user and item, or no canonical
state yet):

* no canonical state: the incoming state becomes canonical, every register stamped ``stamp``
  from ``origin``; every other server is owed the synced registers that are not default (a
  server with no history of the item holding the default needs nothing);
* otherwise each synced register is merged with the canonical value (policy ``"merge"``):

  - ``favorite``: OR; a favourite anywhere stays a favourite;
  - ``rating``: the non-null one; when both are set, the value whose origin comes first in the
    config's server order (a canonical origin that is no longer configured counts as last); an
    equal rating met on an earlier server makes that server its origin, so the outcome does
    not depend on arrival order;
  - ``play_state``: the side with the later last played date (no date is earliest); on equal
    dates played beats not played, then the higher play count, then the larger resume
    position. This is a total order on play states, so the outcome never depends on arrival
    order;

* with policy ``"seed"``: the seed server's first contact wins every synced register; the
  first contact of any other server loses to the canonical state when the seed already has
  history for the item (``seed_known``), and is merged as above when it has not (the seed
  overrides it when it shows up).

**Rewatch protection** (``rewatch_protection``, from ``sync.rewatch_protection``, on by
default; :mod:`jfsync.sync.rewatch`): a known server's play-state change that un-plays a played
item through playback (unplayed, play count above 0) is merged as if ``Played`` had stayed
true, as 12.0 shows a rewatch; its play count, date and position are taken. An explicit
un-play (play count 0) is merged as it is. First contact is not affected.
**Direction** (``servers[].mode``): a server in :attr:`MergePolicy.send_only` is never owed
anything; a change shown by a server in :attr:`MergePolicy.receive_only` never moves the canonical
state nor is owed to anyone (at first contact that server is owed the non-default canonical
values it lacks). :meth:`MergePolicy.for_user` narrows ``synced`` to one person's choices.

A first-contact winner that differs from the canonical value becomes canonical with stamp
``max(stamp, old stamp)`` and origin ``origin``, and every other server is owed it; a canonical
winner that differs from the incoming value is owed to ``origin``. With the merge policy the
first-contact outcome is the same whatever order the servers are first seen in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, NamedTuple

from jfsync.model import (
    ALL_REGISTERS,
    DEFAULT_USER_DATA,
    PlayState,
    Register,
    Stamp,
    UserData,
)
from jfsync.sync.rewatch import protected

_FAVORITE = Register.FAVORITE
_RATING = Register.RATING
_PLAY_STATE = Register.PLAY_STATE

if TYPE_CHECKING:
    from jfsync.config import Config

InitialMerge = Literal["merge", "seed"]
RegisterValue = bool | float | PlayState | None


def next_stamp_ms(wall_ms: int, last_ms: int) -> int:
    """Return the hybrid clock's next value: ``max(wall_ms, last_ms + 1)``.

    The result is strictly after ``last_ms`` whatever the wall clock does, so stamps never go
    backwards across wall clock jumps; the ledger persists ``last_ms`` so they never go
    backwards across restarts either.
    """
    return max(wall_ms, last_ms + 1)


@dataclass(frozen=True, slots=True)
class MergePolicy:
    """What is synced, the server order used for ties, and how first contact is merged."""

    servers: tuple[str, ...]
    synced: frozenset[Register] = frozenset(ALL_REGISTERS)
    initial_merge: InitialMerge = "merge"
    seed_server: str | None = None
    #: Keep Played when a server un-plays an item by starting it again (jfsync.sync.rewatch).
    rewatch_protection: bool = False
    #: Servers jfsync never writes to (``mode: send``): never owed anything.
    send_only: frozenset[str] = frozenset()
    #: Servers whose own changes are never propagated (``mode: receive``): what they show
    #: is recorded as their state (so writes to them stay right) but never moves the
    #: canonical state; at first contact they are owed the canonical values they lack.
    receive_only: frozenset[str] = frozenset()
    #: Per canonical user key: the registers that person syncs, when narrower than ``synced``.
    user_fields: tuple[tuple[str, frozenset[Register]], ...] = ()

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("a merge policy needs at least one server")
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"server names must be unique: {self.servers}")
        if self.initial_merge == "seed" and self.seed_server is None:
            raise ValueError("initial_merge 'seed' needs a seed_server")
        if self.seed_server is not None and self.seed_server not in self.servers:
            raise ValueError(f"seed server {self.seed_server!r} is not one of {self.servers}")

    @classmethod
    def from_config(cls, config: Config) -> MergePolicy:
        """Build the policy from a validated configuration (server order = config order)."""
        seed = config.sync.seed_server if config.sync.initial_merge == "seed" else None
        return cls(
            servers=tuple(s.name for s in config.servers),
            synced=frozenset(config.sync.fields),
            initial_merge=config.sync.initial_merge,
            seed_server=seed,
            rewatch_protection=config.sync.rewatch_protection,
            send_only=frozenset(s.name for s in config.servers if s.mode == "send"),
            receive_only=frozenset(s.name for s in config.servers if s.mode == "receive"),
        )

    def with_user_fields(self, fields: Mapping[str, frozenset[Register]]) -> MergePolicy:
        """This policy with per-user register choices (user key -> registers synced)."""
        narrowed = tuple(sorted((u, frozenset(f) & self.synced) for u, f in fields.items()))
        return replace(self, user_fields=narrowed)

    def for_user(self, user: str) -> MergePolicy:
        """The policy one person's data is merged by (their own register choices applied)."""
        for key, fields in self.user_fields:
            if key == user:
                return replace(self, synced=fields, user_fields=())
        return self

    def receives(self, server: str) -> bool:
        """Tell whether jfsync may write to ``server``."""
        return server not in self.send_only

    @property
    def seed(self) -> str | None:
        """The server whose first contact wins, when the seed policy is on."""
        return self.seed_server if self.initial_merge == "seed" else None

    def rank(self, server: str) -> int:
        """Return the position of ``server`` in the config order (unknown servers last)."""
        try:
            return self.servers.index(server)
        except ValueError:
            return len(self.servers)

    def stamp(self, ms: int, server: str) -> Stamp:
        """Build the stamp of a change that ``server`` showed at hybrid time ``ms``."""
        return Stamp(ms, -self.rank(server))  # Stamp.observed, without the keyword call


class Stamped(NamedTuple):
    """When a canonical register value was decided, and which server showed it.

    A named tuple, as :class:`~jfsync.model.Stamp` is (and for the same reason: the garbage
    collector stops walking a tuple of a stamp and a name once it has looked at it).
    """

    stamp: Stamp
    origin: str


class CanonicalState(NamedTuple):
    """The canonical user data of one (user, item) with a stamp and origin per register.

    A named tuple (immutable, compared and hashed by its fields): a bulk apply builds one per
    observation, and a tuple is built from its fields in one call, where a frozen dataclass
    sets each field through ``object.__setattr__``.
    """

    data: UserData
    favorite: Stamped
    rating: Stamped
    play_state: Stamped

    @classmethod
    def first(cls, data: UserData, stamp: Stamp, origin: str) -> CanonicalState:
        """Build the state of an item seen for the first time: every register from one source."""
        stamped = Stamped(stamp, origin)
        return cls(data=data, favorite=stamped, rating=stamped, play_state=stamped)

    def stamped(self, register: Register) -> Stamped:
        """Return the stamp and origin of one register."""
        if register is _FAVORITE:
            return self.favorite
        if register is _RATING:
            return self.rating
        return self.play_state

    def with_register(
        self, register: Register, value: RegisterValue, stamped: Stamped
    ) -> CanonicalState:
        """Return a copy with one register set to ``value`` decided at ``stamped``."""
        data = self.data.with_register(register, value)
        if register is _FAVORITE:
            return CanonicalState(data, stamped, self.rating, self.play_state)
        if register is _RATING:
            return CanonicalState(data, self.favorite, stamped, self.play_state)
        return CanonicalState(data, self.favorite, self.rating, stamped)

    @property
    def max_stamp(self) -> Stamp:
        """The latest stamp of any register."""
        return max(self.favorite.stamp, self.rating.stamp, self.play_state.stamp)


_new = object.__new__


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What one observation did: changes seen, the new canonical state, the writes owed."""

    #: Synced registers whose incoming value differs from what jfsync knew of ``origin``
    #: (its last-known state; at first contact, the canonical value or the default).
    changed: frozenset[Register]
    #: True when ``origin`` had no history for this user and item (or nobody had).
    first_contact: bool
    canonical: CanonicalState
    #: Registers whose canonical *value* moved.
    canonical_changed: frozenset[Register]
    #: Registers owed to each server (``origin`` included when it lost), non-empty sets only.
    writes: Mapping[str, frozenset[Register]] = field(default_factory=dict)


_set_changed = MergeResult.__dict__["changed"].__set__
_set_first_contact = MergeResult.__dict__["first_contact"].__set__
_set_canonical = MergeResult.__dict__["canonical"].__set__
_set_canonical_changed = MergeResult.__dict__["canonical_changed"].__set__
_set_writes = MergeResult.__dict__["writes"].__set__


def merge(
    policy: MergePolicy,
    *,
    canonical: CanonicalState | None,
    last_known: UserData | None,
    incoming: UserData,
    stamp: Stamp,
    origin: str,
    seed_known: bool = False,
) -> MergeResult:
    """Merge the state ``origin`` showed into the canonical state (rules in the module doc).

    ``seed_known`` tells whether the seed server (seed policy only) has history for this user
    and item; it is ignored otherwise.
    """
    synced = policy.synced
    if origin in policy.receive_only:
        if canonical is None:
            raise ValueError(
                f"{origin} is receive-only: with no canonical state its state decides nothing "
                "(record it as its last-known state instead of merging)"
            )
        return _receiver(policy, canonical, last_known, incoming, origin)
    if canonical is None:
        return _first_ever(policy, last_known, incoming, stamp, origin)
    if last_known is None:
        return _first_contact(policy, canonical, incoming, stamp, origin, seed_known)

    changed = changed_registers(synced, last_known, incoming)
    # Built once, at the end: one observation usually moves one register, and a bulk apply
    # runs this for every item of a library.
    data = canonical.data
    favorite, rating, play_state = data.favorite, data.rating, data.play_state
    won_favorite = won_rating = won_play_state = False
    moved: list[Register] = []
    lost: list[Register] = []
    if _FAVORITE in changed:
        value_f = incoming.favorite
        if later(stamp, canonical.favorite.stamp):
            if value_f != favorite:
                moved.append(_FAVORITE)
            favorite, won_favorite = value_f, True
        elif value_f != favorite:
            lost.append(_FAVORITE)
    if _RATING in changed:
        value_r = incoming.rating
        if later(stamp, canonical.rating.stamp):
            if value_r != rating:
                moved.append(_RATING)
            rating, won_rating = None if value_r is None else float(value_r), True
        elif value_r != rating:
            lost.append(_RATING)
    if _PLAY_STATE in changed:
        value_p = incoming.play_state
        if policy.rewatch_protection:
            value_p = protected(play_state, value_p)
        if later(stamp, canonical.play_state.stamp):
            if value_p is not play_state and value_p != play_state:
                moved.append(_PLAY_STATE)
            play_state, won_play_state = value_p, True
        elif value_p is not play_state and value_p != play_state:
            lost.append(_PLAY_STATE)
    new = canonical
    if won_favorite or won_rating or won_play_state:
        winner = Stamped(stamp, origin)
        if (
            favorite is incoming.favorite
            and rating is incoming.rating
            and play_state is incoming.play_state
        ):
            merged = incoming  # shared (decoded states are interned): encoded once per burst
        else:
            merged = UserData(favorite, rating, play_state)
        new = CanonicalState(
            merged,
            winner if won_favorite else canonical.favorite,
            winner if won_rating else canonical.rating,
            winner if won_play_state else canonical.play_state,
        )
    moved_set = frozenset(moved)
    return MergeResult(
        changed=changed,
        first_contact=False,
        canonical=new,
        canonical_changed=moved_set,
        writes=writes_owed(policy, origin, moved_set, frozenset(lost)) if moved or lost else {},
    )


def later(stamp: Stamp, other: Stamp) -> bool:
    """``stamp > other`` (hybrid-clock milliseconds, then tiebreak), without the dataclass
    comparison's tuple building: it runs for every register of every observation."""
    ms, other_ms = stamp.ms, other.ms
    return ms > other_ms or (ms == other_ms and stamp.tiebreak > other.tiebreak)


#: Per synced register set: the changed registers by difference bits (1 favourite, 2 rating,
#: 4 play state), shared frozensets, so a diff builds no set.
_DIFF_SETS: dict[frozenset[Register], tuple[frozenset[Register], ...]] = {}


def changed_registers(
    synced: frozenset[Register], before: UserData, after: UserData
) -> frozenset[Register]:
    """The registers of ``synced`` whose value differs between ``before`` and ``after``."""
    sets = _DIFF_SETS.get(synced)
    if sets is None:
        if len(_DIFF_SETS) >= 256:
            _DIFF_SETS.clear()
        sets = _DIFF_SETS[synced] = tuple(
            frozenset(r for b, r in ((1, _FAVORITE), (2, _RATING), (4, _PLAY_STATE)) if bits & b)
            & synced
            for bits in range(8)
        )
    if before is after:
        return sets[0]
    return sets[diff_bits(before, after)]


def diff_bits(before: UserData, after: UserData) -> int:
    """The registers whose value differs, as bits: 1 favourite, 2 rating, 4 play state."""
    bits = 0
    if before.favorite != after.favorite:
        bits = 1
    if before.rating != after.rating:
        bits |= 2
    ps_before, ps_after = before.play_state, after.play_state
    if ps_before is not ps_after and play_states_differ(ps_before, ps_after):
        bits |= 4
    return bits


def play_states_differ(a: PlayState, b: PlayState) -> bool:
    """``a != b``, field by field (the dataclass's ``__eq__`` builds two tuples per call)."""
    return (
        a.last_played_s != b.last_played_s
        or a.play_count != b.play_count
        or a.played != b.played
        or a.position_ticks != b.position_ticks
    )


def first_contact_winner(
    policy: MergePolicy,
    register: Register,
    *,
    current: RegisterValue,
    current_origin: str,
    incoming: RegisterValue,
    origin: str,
    seed_known: bool = False,
) -> Literal["canonical", "incoming"]:
    """Decide one register at first contact: does the canonical or the incoming value win?"""
    if current == incoming:
        return "canonical"
    seed = policy.seed
    if seed is not None:
        if origin == seed:
            return "incoming"
        if seed_known:
            return "canonical"
    if register is Register.FAVORITE:
        return "incoming" if incoming is True else "canonical"
    if register is Register.RATING:
        if incoming is None:
            return "canonical"
        if current is None:
            return "incoming"
        return "incoming" if policy.rank(origin) < policy.rank(current_origin) else "canonical"
    assert isinstance(current, PlayState)
    assert isinstance(incoming, PlayState)
    return "incoming" if play_state_key(incoming) > play_state_key(current) else "canonical"


def play_state_key(state: PlayState) -> tuple[bool, int, bool, int, int]:
    """Order play states at first contact: later date, then played, play count, position."""
    has_date = state.last_played_s is not None
    return (
        has_date,
        state.last_played_s if state.last_played_s is not None else 0,
        state.played,
        state.play_count,
        state.position_ticks,
    )


def _first_ever(
    policy: MergePolicy,
    last_known: UserData | None,
    incoming: UserData,
    stamp: Stamp,
    origin: str,
) -> MergeResult:
    base = last_known if last_known is not None else DEFAULT_USER_DATA
    changed = changed_registers(policy.synced, base, incoming)
    owed = changed_registers(policy.synced, DEFAULT_USER_DATA, incoming)
    return MergeResult(
        changed=changed,
        first_contact=True,
        canonical=CanonicalState.first(incoming, stamp, origin),
        canonical_changed=owed,
        writes=writes_owed(policy, origin, owed, frozenset()),
    )


#: What the last first contact decided (:func:`_first_contact`), with what it was decided from
#: (equal inputs decide the same; mostly they are the same objects): a pusher's compare meets
#: a peer's first contact with a whole batch of items showing one state against one canonical
#: value (a "mark played" sent on). The pair is replaced whole: a thread sees one or the other.
_FirstContactInputs = tuple[MergePolicy, UserData, UserData, str, str, str, str, bool]
_FirstContactDecision = tuple[
    tuple[Register, ...], frozenset[Register], frozenset[Register], dict[str, frozenset[Register]]
]
_last_first_contact: tuple[_FirstContactInputs, _FirstContactDecision] | None = None


def _first_contact(
    policy: MergePolicy,
    canonical: CanonicalState,
    incoming: UserData,
    stamp: Stamp,
    origin: str,
    seed_known: bool,
) -> MergeResult:
    global _last_first_contact
    inputs: _FirstContactInputs = (
        policy,
        canonical.data,
        incoming,
        origin,
        canonical.favorite.origin,
        canonical.rating.origin,
        canonical.play_state.origin,
        seed_known,
    )
    last = _last_first_contact
    if last is not None and last[0] == inputs:  # (element by element, identity first)
        decision = last[1]
    else:
        decision = _decide_first_contact(policy, canonical, incoming, origin, seed_known)
        _last_first_contact = (inputs, decision)
    taken, moved, changed, writes = decision
    new = canonical
    for register in taken:
        held = canonical.stamped(register)
        new = new.with_register(
            register, incoming.get(register), Stamped(max(stamp, held.stamp), origin)
        )
    result = _new(MergeResult)  # through its slots: a compare batch makes one per item
    _set_changed(result, changed)
    _set_first_contact(result, True)
    _set_canonical(result, new)
    _set_canonical_changed(result, moved)
    _set_writes(result, dict(writes))
    return result


def _decide_first_contact(
    policy: MergePolicy,
    canonical: CanonicalState,
    incoming: UserData,
    origin: str,
    seed_known: bool,
) -> _FirstContactDecision:
    """The first contact's decision, which depends on the values and origins only: the
    registers taken from ``incoming`` (in order, each stamped ``max(stamp, old stamp)`` from
    ``origin``), those moved, those changed and the writes owed."""
    taken: list[Register] = []
    moved: set[Register] = set()
    lost: set[Register] = set()
    for register in _ordered(policy.synced):
        current = canonical.data.get(register)
        value = incoming.get(register)
        held = canonical.stamped(register)
        if current == value:
            if register is Register.RATING and policy.rank(origin) < policy.rank(held.origin):
                # Same rating, earlier server: it now holds it "first in config order", so a
                # later first contact compares against the right rank whatever the arrival order.
                taken.append(register)
            continue
        winner = first_contact_winner(
            policy,
            register,
            current=current,
            current_origin=held.origin,
            incoming=value,
            origin=origin,
            seed_known=seed_known,
        )
        if winner == "incoming":
            moved.add(register)
            taken.append(register)
        else:
            lost.add(register)
    changed = frozenset([r for r in policy.synced if incoming.get(r) != canonical.data.get(r)])
    return (
        tuple(taken),
        frozenset(moved),
        changed,
        writes_owed(policy, origin, frozenset(moved), frozenset(lost)),
    )


def _receiver(
    policy: MergePolicy,
    canonical: CanonicalState,
    last_known: UserData | None,
    incoming: UserData,
    origin: str,
) -> MergeResult:
    """A receive-only server showed ``incoming``: its changes never move the canonical state.

    At first contact it is owed the canonical values that are not the default and differ from
    what it holds (it receives what the others have); its later edits stay its own until the
    register changes elsewhere.
    """
    base = last_known if last_known is not None else DEFAULT_USER_DATA
    changed = frozenset([r for r in policy.synced if incoming.get(r) != base.get(r)])
    owed: frozenset[Register] = frozenset()
    if last_known is None and policy.receives(origin):
        owed = frozenset(
            r
            for r in policy.synced
            if canonical.data.get(r) != incoming.get(r)
            and canonical.data.get(r) != DEFAULT_USER_DATA.get(r)
        )
    return MergeResult(
        changed=changed,
        first_contact=last_known is None,
        canonical=canonical,
        canonical_changed=frozenset(),
        writes={origin: owed} if owed else {},
    )


def writes_owed(
    policy: MergePolicy,
    origin: str,
    to_others: frozenset[Register],
    to_origin: frozenset[Register],
) -> dict[str, frozenset[Register]]:
    """What each server is owed: ``to_others`` by every server but ``origin`` that receives,
    ``to_origin`` by ``origin`` (when it receives); servers owed nothing are left out."""
    writes: dict[str, frozenset[Register]] = {}
    if to_others:
        for server in policy.servers:
            if server != origin and server not in policy.send_only:
                writes[server] = to_others
    if to_origin and origin not in policy.send_only:
        writes[origin] = to_origin
    return writes


def _ordered(registers: frozenset[Register]) -> Sequence[Register]:
    """Return registers in their fixed order, so results never depend on set iteration."""
    return [r for r in ALL_REGISTERS if r in registers]
