"""The apply path: observations, compare reads, intents and acks on one transaction's pairs.

:class:`Batch` is the working set of one write transaction: it loads the (user, item) pairs
the transaction needs, applies each observation in order (the echo rule of
:mod:`jfsync.sync.echo`, the diff against the origin's last-known state, a hybrid-clock stamp,
the merge of :mod:`jfsync.sync.merge` by the person's own policy, the outbox rows of every
server that has the user, holding only what :class:`~jfsync.sync.ledger.policy.LedgerPolicy`
lets it be owed), records the states a write may leave and the acks of writes, and flushes
what changed through the transaction's :class:`~jfsync.sync.ledger.writer.StateWriter`. What
an observation is (:class:`Observation`) and what applying it did (:class:`Applied`,
:class:`Outcome`) live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NamedTuple, TypeVar

from jfsync.model import DEFAULT_USER_DATA, PlayState, Register, Stamp, UserData, interned
from jfsync.sync.echo import (
    PendingWrite,
    Verdict,
    after_read,
    classify_event,
    match_echo,
    record_write,
)
from jfsync.sync.ledger.cache import CachedPair
from jfsync.sync.ledger.clock import Clock
from jfsync.sync.ledger.codec import MASKS as _MASKS
from jfsync.sync.ledger.codec import Key, Pair, mask_bits
from jfsync.sync.ledger.maps import IdMaps
from jfsync.sync.ledger.outbox import OutboxRow, WorkRow
from jfsync.sync.ledger.policy import LedgerPolicy
from jfsync.sync.ledger.writer import StateWriter
from jfsync.sync.merge import (
    CanonicalState,
    MergePolicy,
    Stamped,
    changed_registers,
    diff_bits,
    merge,
    play_states_differ,
    writes_owed,
)
from jfsync.sync.rewatch import protected

Source = Literal["event", "scan", "compare", "read"]

_K = TypeVar("_K", bound=tuple[int, ...])
_V = TypeVar("_V")

_NOTHING: frozenset[Register] = frozenset()
#: "No row loaded or made for this key" (None: the key's row is gone).
_ABSENT = WorkRow(None, _NOTHING, DEFAULT_USER_DATA, 0, 0)
_DEFAULT = DEFAULT_USER_DATA
#: Builds a named tuple (a :class:`WorkRow`, a :class:`Stamp`, a :class:`Stamped`, a
#: :class:`CanonicalState`, an :class:`Applied`) from all of its fields (no defaults to fill
#: in, a call less than its ``__new__``).
_new_row = tuple.__new__
#: The outbox rows of an observation that queued none (shared: read it, never change it).
_NO_ROWS: dict[str, frozenset[Register]] = {}


#: Observations from which :meth:`Batch.apply_all` numbers the rows it makes as it makes them
#: (taking the first id costs a query, which a transaction of a few rows does not make up for).
EARLY_NUMBERING_MIN = 32


class Outcome(StrEnum):
    """What an observation turned out to be."""

    ECHO = "echo"
    STALE = "stale"
    #: An event the echo rule cannot attribute (a stale event or the user taking a write
    #: back): nothing applied; the caller reads the item from the server and applies that.
    AMBIGUOUS = "ambiguous"
    #: A read requested before something the ledger already knows of that key: not applied.
    OUTDATED = "outdated"
    UNCHANGED = "unchanged"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class Observation:
    """A state ``server`` holds for ``user`` and ``item`` (canonical keys), seen at ``wall_ms``.

    ``source`` says how it was seen: a websocket ``event``, a ``scan`` page, the pusher's
    ``compare`` read before a write, or a ``read`` of the item that settles an ambiguous
    event. Only events consume pending echoes. For every read (scan, compare, read),
    ``wall_ms`` must be the time the read was *requested*, and ``read_seq`` the ticket
    :meth:`Ledger.ticket` gave just before it was requested: a read older than what the ledger
    already learnt of that (server, user, item) is never applied (:attr:`Outcome.OUTDATED`).
    A read without a ticket is taken as fresh.
    """

    server: str
    user: str
    item: str
    state: UserData
    wall_ms: int
    source: Source = "event"
    read_seq: int | None = None


class Applied(NamedTuple):
    """What applying one observation did (for logs, metrics and tests).

    A named tuple: a bulk apply builds one per observation, in one call from its fields.
    """

    observation: Observation
    outcome: Outcome
    #: Synced registers that differed from what jfsync knew of that server.
    changed: frozenset[Register] = frozenset()
    first_contact: bool = False
    #: Registers whose canonical value moved.
    canonical_changed: frozenset[Register] = frozenset()
    stamp: Stamp | None = None
    #: Outbox rows this observation created, changed or emptied: the registers each now holds
    #: (an empty set: the row is gone because nothing is owed any more). Results of a bulk
    #: apply that queued the same share one dict, and those that queued none share an empty
    #: one: read it, never change it.
    queued: dict[str, frozenset[Register]] = _NO_ROWS


def _outcome(obs: Observation, outcome: Outcome) -> Applied:
    """``Applied(obs, outcome)`` (nothing changed, queued or stamped), in one call."""
    return _new_row(Applied, (obs, outcome, _NOTHING, False, _NOTHING, None, _NO_ROWS))


def named_like(row: WorkRow, like: OutboxRow) -> OutboxRow:
    """``row`` (numbered) named like ``like``: ``like`` itself when ``row`` is still what it
    says (a compare that changed nothing hands the pusher's row back)."""
    row_id, mask, desired, version, created_ms, attempts, next_ms, error, dead = row
    if (
        row_id == like.id
        and version == like.version
        and (mask is like.registers or mask == like.registers)
        and (desired is like.desired or desired == like.desired)
        and created_ms == like.created_ms
        and attempts == like.attempts
        and next_ms == like.next_attempt_ms
        and error == like.last_error
        and dead == like.dead
    ):
        return like
    return row.as_outbox_row(like)


def _unnumbered(written: Mapping[Key, WorkRow | None]) -> list[tuple[Key, WorkRow]]:
    """The rows of ``written`` without an id, with their keys, in its order."""
    return [(key, row) for key, row in written.items() if row is not None and row.id is None]


def _in_key_order(values: Mapping[_K, _V], keys: Iterable[_K]) -> dict[_K, _V]:
    """``values`` of ``keys``, in key order (a bulk apply's keys come sorted or nearly: sorting
    them costs one pass)."""
    return {key: values[key] for key in sorted(keys)}


class Batch:
    """The in-memory working set of one transaction: load, apply in order, flush.

    Its pairs come from the transaction's :class:`StateWriter` (the state cache or SQLite) and go
    back through it; the hybrid clock and read tickets from the ledger's :class:`Clock`; what
    may be owed to whom from the :class:`LedgerPolicy` in force when the transaction began.
    """

    def __init__(
        self, rules: LedgerPolicy, maps: IdMaps, clock: Clock, tables: StateWriter
    ) -> None:
        self.rules = rules
        #: The merge policy in force (each person's own choices: :meth:`MergePolicy.for_user`).
        self.policy = policy = rules.merge
        self.maps = maps
        self.clock = clock
        self.tables = tables
        self._loaded_pairs: set[Pair] = set()
        self.canon: dict[Pair, CanonicalState] = {}
        self.lk: dict[Key, UserData] = {}
        self.echo: dict[Key, tuple[PendingWrite, ...]] = {}
        self.rows: dict[Key, WorkRow | None] = {}
        #: Last-seen times this transaction moved (merged into the clock's at flush).
        self.seen: dict[Key, int] = {}
        self.members: dict[int, set[int]] = {}
        #: Servers whose library is indexed (they map items), and which loaded items each maps.
        self.indexed: set[int] = set()
        self.mapped: dict[int, set[int]] = {}
        #: Ids of the rows loaded, by key (a row created again for that key reuses its id).
        self._loaded_rows: dict[Key, int] = {}
        #: Every server some key of :attr:`rows` has held a row for (grows only): a server not
        #: in it has no row of any key here, so the bulk path need not look one up.
        self._row_peers: set[int] = set()
        #: The new rows :meth:`apply_all` numbered as it made them (ids from ``_early_first``
        #: on, one each in the order made, keys ascending: the ids :meth:`_number` would give
        #: them), while ``_early_ok`` (a row made out of key order or one of them dropped ends
        #: it: :meth:`_number` then numbers them all again). ``_unnumbered``: a row was made
        #: without an id since the last numbering.
        self._early: list[Key] = []
        self._early_first = 0
        self._early_ok = True
        self._unnumbered = False
        #: What this batch changed, in the order it did (dicts as ordered sets: a bulk apply
        #: changes keys in the order their ids were made, so sorting them at flush is cheap).
        self._dirty_canon: dict[Pair, None] = {}
        self._dirty_lk: dict[Key, None] = {}
        self._dirty_echo: dict[Key, None] = {}
        self._dirty_rows: dict[Key, None] = {}
        self._clock_moved = False
        #: Per batch memos of the hot path (policies by person, tiebreaks by server, the
        #: servers owed rows by (user, origin): reset when :meth:`load` adds members).
        self._user_policies: dict[str, MergePolicy] = {}
        self._tiebreaks: dict[str, int] = {}
        self._targets: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {}
        #: And those of :meth:`apply_all`: per person (:meth:`_profile_of`), per (user, peer)
        #: the registers it may be owed, per (origin, moved, lost) what each server is owed.
        self._profiles: dict[str, tuple[int, frozenset[str], bool]] = {}
        self._row_targets: dict[tuple[int, int], tuple[tuple[int, str, int, bool], ...]] = {}
        #: At least every ticket in :attr:`seen` and in the clock's seen map.
        self._seen_high = clock.seen_high
        self._writes: dict[tuple[str, int, int], dict[str, int]] = {}
        #: The pending echo lists this batch made, by the identity of what they were made of
        #: (:meth:`with_write`, :meth:`without`): a round of intents or acks gives hundreds
        #: of keys the same list (one state written over one state, at one time), which is
        #: then built, pruned and encoded once and shared. Each entry holds its inputs, so no
        #: id in a key is reused while the batch lives.
        self._echo_memo: dict[tuple[int, ...], tuple[object, ...]] = {}
        seed = policy.seed
        self._seed_sid = maps.sid_of(seed) if seed is not None else None
        self._configured = {maps.sid(n) for n in policy.servers}

    def load(
        self, pairs: Set[Pair], *, with_members: bool = True, empty: Set[Pair] = frozenset()
    ) -> None:
        """Read everything the given (user, item) pairs need: from the cache, else SQLite.

        Pairs this batch already loaded are left as the batch has them (it may have changed
        them). From SQLite it takes a few queries per chunk of pairs; ``empty`` pairs (of a
        user or item this transaction created) have nothing to read.
        """
        if self._loaded_pairs:
            wanted = pairs - self._loaded_pairs
            self._loaded_pairs |= wanted
        else:
            wanted = pairs
            self._loaded_pairs = set(pairs)  # a copy in C: the caller keeps ``pairs``
        self._take(self.tables.load(wanted, empty))
        if with_members:
            self.load_members(wanted)

    def load_entries(self, entries: Mapping[Pair, CachedPair]) -> None:
        """:meth:`load` (without members) of pairs the caller loaded from this batch's
        writer already, in this transaction and before anything was written in it."""
        wanted = entries.keys() - self._loaded_pairs
        self._loaded_pairs |= wanted
        self._take({pair: entries[pair] for pair in wanted})

    def _take(self, found: Mapping[Pair, CachedPair]) -> None:
        """Put the loaded pairs ``found`` into the working set."""
        canon, rows, loaded, row_peers = self.canon, self.rows, self._loaded_rows, self._row_peers
        lk_update, echo_update = self.lk.update, self.echo.update
        for pair, entry in found.items():
            state = entry.canon
            if state is not None:
                canon[pair] = state
            if entry.lk:
                lk_update(entry.lk)
            if entry.echo:
                echo_update(entry.echo)
            if entry.rows:
                rows.update(entry.rows)
                for key, row in entry.rows.items():
                    assert row.id is not None  # stored rows are numbered
                    loaded[key] = row.id
                    row_peers.add(key[2])

    def load_members(self, pairs: Set[Pair]) -> None:
        """Read which servers have the users of ``pairs`` and, when indexed, map their items
        (what applying an observation of them needs; :meth:`load` does it unless told not)."""
        if pairs:
            db, cached = self.tables.db, self.tables.cached
            self.members.update(self.maps.members(db, {u for u, _ in pairs}, cached=cached))
            self._targets.clear()
            self._row_targets.clear()
            if self.maps.indexed(db, self._configured, cached=cached):
                indexed, mapped = self.maps.mappings(
                    db, {i for _, i in pairs}, self._configured, cached=cached
                )
                self.indexed |= indexed
                for sid, items in mapped.items():
                    self.mapped.setdefault(sid, set()).update(items)

    def lacks_item(self, server_id: int, item_id: int) -> bool:
        """Tell whether an indexed server does not have the item."""
        return server_id in self.indexed and item_id not in self.mapped.get(server_id, set())

    def seen_seq(self, key: Key) -> int:
        """The ticket of the last thing learnt of ``key`` (0: nothing in this process)."""
        return max(self.seen.get(key, 0), self.clock.seen(key))

    def see(self, key: Key, seq: int) -> None:
        """Record that ``key`` was seen (an event, a read, a write) at ticket ``seq``."""
        seen = self.seen
        if seq > seen.get(key, 0) and seq > self.clock.seen(key):
            seen[key] = seq
            if seq > self._seen_high:
                self._seen_high = seq

    def apply_all(
        self,
        observations: Sequence[Observation],
        keys: Sequence[Key],
        pairs: Sequence[Pair] | None = None,
    ) -> list[Applied]:
        """Apply ``observations`` (``keys``: their ids; ``pairs``: their (user, item) ids, when
        the caller has them) in order, as :meth:`apply` does each.

        A bulk message or a scan page is thousands of observations of one shape: no pending
        echo, and either a known server's change or the first state anyone showed of an item.
        Those run inline here: the ticket check, the diff as register bits, the merge of
        :func:`jfsync.sync.merge.merge` for exactly these two cases written out, and each
        new outbox row built once; anything else (a pending echo, a first contact with a
        canonical state, a receive-only server, a row already queued) takes the general path
        (:meth:`apply`, :meth:`_merge_in`, :meth:`refresh_row`). Both give the same states,
        rows and outcomes (``tests/core/test_ledger_bulk.py`` compares them on random
        histories).
        """
        results: list[Applied] = []
        append = results.append
        echo, lk, canon, rows, seen = self.echo, self.lk, self.canon, self.rows, self.seen
        dirty_lk, dirty_canon, dirty_rows = self._dirty_lk, self._dirty_canon, self._dirty_rows
        clock = self.clock
        ticket, clock_seen = clock.next_ticket, clock.seen
        loaded_rows, mapped = self._loaded_rows, self.mapped
        row_targets = self._row_targets
        unchanged, changed_outcome = Outcome.UNCHANGED, Outcome.CHANGED
        ticked = False
        # Every ticket seen so far is at most ``high``: a ticket above it is newer than what
        # the ledger learnt of any key, with no look-up.
        high = self._seen_high
        # What the previous observation's user, origin and outcome gave (a bulk message is
        # thousands of one user's observations from one server, most with one outcome).
        user = server = None
        receive_only: frozenset[str] = frozenset()
        synced_bits, rewatch, tiebreak = 0, False, 0
        targets_key: tuple[int, int] | None = None
        targets: tuple[tuple[int, str, int, bool], ...] = ()
        writes_key: tuple[str, int, int] | None = None
        owed_by: dict[str, int] = {}
        # And what the previous known server's change decided: the same previous, incoming
        # and canonical states (a bulk message's) decide the same registers.
        last_previous: UserData | None = None
        last_state: UserData | None = None
        last_data: UserData | None = None
        last_decision: tuple[int, int, PlayState] = (0, 0, _DEFAULT.play_state)
        # What each target is owed for the current targets and outcome (built for these two),
        # and the last pruning of what a peer already holds (for these states and bits).
        plan_targets: tuple[tuple[int, str, int, bool], ...] | None = None
        plan_owed: dict[str, int] | None = None
        plan: tuple[tuple[int, str, int, int, bool], ...] = ()
        row_peers = self._row_peers
        # (How many servers had a row here when the plan was made.)
        plan_peers = -1
        peer_count = row_peers.__len__
        early = self._early
        next_id = self._early_first + len(early)
        pruned_known: UserData | None = None
        pruned_desired: UserData | None = None
        pruned_in = pruned_out = 0
        last_queued: dict[str, frozenset[Register]] | None = None
        raw_state: UserData | None = None
        shared_state = _DEFAULT
        # And the registers the last first state changed (from its base, from the defaults).
        first_state: UserData | None = None
        first_base: UserData | None = None
        first_bits = first_moved = 0
        # The hybrid clock, ticked here (Clock.tick inline) and handed back to the clock around
        # every call of the general path (which ticks it itself) and at the end.
        clock_ms = clock.ms
        if len(observations) < EARLY_NUMBERING_MIN:
            self._early_ok = False  # (a few rows: numbered at flush, no query for the first id)
        try:
            if pairs is None:
                pairs = [(uid, iid) for uid, iid, _ in keys]
            for obs, key, pair in zip(observations, keys, pairs, strict=True):
                if echo.get(key):
                    self._seen_high = high
                    clock.ms = clock_ms
                    append(self.apply(obs, key))  # the echo rule decides first
                    clock_ms = clock.ms
                    high = self._seen_high
                    continue
                source = obs.source
                if source == "event":
                    seq = ticket()
                    if seq > high:
                        seen[key] = high = seq
                    elif seq > seen.get(key, 0) and seq > clock_seen(key):
                        seen[key] = seq
                else:
                    # A read: never applied over something learnt after it was requested.
                    seq = ticket() if obs.read_seq is None else obs.read_seq
                    if seq < high and (seen.get(key, 0) > seq or clock_seen(key) > seq):
                        append(_outcome(obs, Outcome.OUTDATED))
                        continue
                    if source != "scan":
                        if seq > high:
                            seen[key] = high = seq
                        elif seq > seen.get(key, 0) and seq > clock_seen(key):
                            seen[key] = seq
                state = obs.state
                if state is not raw_state:
                    # Shared: the same value then goes by identity here, in the rows made
                    # and in the compares and acks of their writes.
                    raw_state, shared_state = state, interned(state)
                state = shared_state
                if obs.user is not user:
                    user = obs.user
                    profile = self._profiles.get(user)
                    if profile is None:
                        profile = self._profile_of(user)
                    synced_bits, receive_only, rewatch = profile
                if obs.server is not server:
                    server = obs.server
                    tiebreak = self._tiebreak_of(server)
                uid, iid, sid = key
                previous = lk.get(key)
                canonical = canon.get(pair)
                if canonical is None:
                    if server in receive_only:
                        clock.ms = clock_ms
                        append(self._merge_in(obs, key))
                        clock_ms = clock.ms
                        continue
                    # The first state anyone showed of the item (merge's first-ever case).
                    base = _DEFAULT if previous is None else previous
                    if state is not first_state or base is not first_base:
                        first_state, first_base = state, base
                        first_bits = diff_bits(base, state)
                        first_moved = diff_bits(_DEFAULT, state)
                    bits = first_bits & synced_bits  # (the same two states: the same bits)
                    moved = first_moved & synced_bits  # owed to the others
                    lost = 0
                    wall = obs.wall_ms
                    clock_ms = ms = wall if wall > clock_ms else clock_ms + 1
                    ticked = True
                    stamp = _new_row(Stamp, (ms, tiebreak))
                    stamped = _new_row(Stamped, (stamp, server))
                    new = _new_row(CanonicalState, (state, stamped, stamped, stamped))
                    first_contact = True
                elif previous is None or server in receive_only:
                    clock.ms = clock_ms
                    append(self._merge_in(obs, key))  # first contact of a server, or a receiver
                    clock_ms = clock.ms
                    continue
                else:
                    # A known server (merge's known case): each changed register by its stamp.
                    if previous is state:
                        append(_outcome(obs, unchanged))
                        continue
                    data = canonical.data
                    fav, rat = state.favorite, state.rating
                    if previous is last_previous and state is last_state and data is last_data:
                        bits, differs, ps = last_decision  # the same three states as before
                    else:
                        ps, old_ps = state.play_state, previous.play_state
                        bits = 0
                        if fav != previous.favorite:
                            bits = 1
                        old_rating = previous.rating
                        if rat != old_rating:
                            if rat is not old_rating:  # as ``previous == state`` compares fields
                                bits |= 2
                            else:
                                bits |= 8  # only ``!=`` (NaN) says so: as changed_registers
                        ps_moved = ps is not old_ps and play_states_differ(ps, old_ps)
                        if ps_moved:
                            bits |= 4
                        if not bits & 7:
                            append(_outcome(obs, unchanged))
                            continue
                        bits = ((bits >> 2) & 2 | bits) & synced_bits
                        if not bits:
                            lk[key] = state
                            dirty_lk[key] = None
                            append(_outcome(obs, unchanged))
                            continue
                        # Which changed registers differ from the canonical value.
                        differs = 0
                        if bits & 1 and fav != data.favorite:
                            differs = 1
                        if bits & 2 and rat != data.rating:
                            differs |= 2
                        if bits & 4:
                            play_state = data.play_state
                            if rewatch:
                                ps = protected(play_state, ps)
                            if play_state is old_ps and ps is state.play_state:
                                differs |= 4  # it moved from what is the canonical value
                            elif ps is not play_state and play_states_differ(ps, play_state):
                                differs |= 4
                        last_previous, last_state, last_data = previous, state, data
                        last_decision = (bits, differs, ps)
                    wall = obs.wall_ms
                    clock_ms = ms = wall if wall > clock_ms else clock_ms + 1
                    ticked = True
                    stamp = _new_row(Stamp, (ms, tiebreak))
                    # The changed registers whose canonical stamp this one is later than win.
                    won = 0
                    if bits & 1:
                        held = canonical.favorite.stamp
                        if ms > held.ms or (ms == held.ms and tiebreak > held.tiebreak):
                            won = 1
                    if bits & 2:
                        held = canonical.rating.stamp
                        if ms > held.ms or (ms == held.ms and tiebreak > held.tiebreak):
                            won |= 2
                    if bits & 4:
                        held = canonical.play_state.stamp
                        if ms > held.ms or (ms == held.ms and tiebreak > held.tiebreak):
                            won |= 4
                    moved = won & differs
                    lost = bits & ~won & differs
                    if won:
                        winner = _new_row(Stamped, (stamp, server))
                        favorite = fav if won & 1 else data.favorite
                        rating = (None if rat is None else float(rat)) if won & 2 else data.rating
                        play_state = ps if won & 4 else data.play_state
                        if favorite is fav and rating is rat and play_state is state.play_state:
                            merged = state  # shared (decoded states are interned)
                        else:
                            merged = UserData(favorite, rating, play_state)
                        new = _new_row(
                            CanonicalState,
                            (
                                merged,
                                winner if won & 1 else canonical.favorite,
                                winner if won & 2 else canonical.rating,
                                winner if won & 4 else canonical.play_state,
                            ),
                        )
                    else:
                        new = canonical
                    first_contact = False
                # The new states, then the rows of every server that may be owed something.
                if new is not canonical:
                    canon[pair] = new
                    dirty_canon[pair] = None
                lk[key] = state
                dirty_lk[key] = None
                if (
                    writes_key is None
                    or moved != writes_key[1]
                    or lost != writes_key[2]
                    or (server is not writes_key[0])
                ):
                    writes_key = (server, moved, lost)
                    known_writes = self._writes.get(writes_key)
                    owed_by = self._writes_of(*writes_key) if known_writes is None else known_writes
                desired = new.data
                queued: dict[str, frozenset[Register]] = {}
                if targets_key is None or uid != targets_key[0] or sid != targets_key[1]:
                    targets_key = (uid, sid)
                    known_targets = row_targets.get(targets_key)
                    targets = (
                        self._row_targets_of(uid, sid) if known_targets is None else known_targets
                    )
                if (
                    targets is not plan_targets
                    or owed_by is not plan_owed
                    or peer_count() != plan_peers
                ):
                    # What each target is owed: the same for every observation until the
                    # targets (user, origin) or the outcome (origin, moved, lost) change, or
                    # a server gets its first row here. A target owed nothing that has no row
                    # here has nothing to do (the origin, mostly): left out.
                    plan_targets, plan_owed, plan_peers = targets, owed_by, peer_count()
                    plan = tuple(
                        (target, name, owed, may, indexed)
                        for target, name, may, indexed in targets
                        if (owed := owed_by.get(name, 0)) or target in row_peers
                    )
                for target, name, owed, may, indexed in plan:
                    if target in row_peers:  # else no key of it has a row here: none to refresh
                        tkey = (uid, iid, target)
                        existing = rows.get(tkey, _ABSENT)
                        if existing is not None and existing is not _ABSENT:
                            if self.refresh_row(tkey, _MASKS[owed], desired, ms, wall):
                                row = rows.get(tkey)
                                queued[name] = _NOTHING if row is None else row.mask
                            continue
                        if not owed or (indexed and iid not in mapped.get(target, ())):
                            continue
                    else:
                        if not owed or (indexed and iid not in mapped.get(target, ())):
                            continue
                        tkey = (uid, iid, target)
                        existing = _ABSENT
                    owed &= may
                    known = lk.get(tkey)
                    if known is not None and owed:
                        # What the peer holds already is not owed (refresh_row's pruning).
                        if known is desired:
                            continue
                        if (
                            known is pruned_known
                            and desired is pruned_desired
                            and owed == pruned_in
                        ):
                            owed = pruned_out  # the same states as the last one pruned
                        else:
                            pruned_known, pruned_desired, pruned_in = known, desired, owed
                            if owed & 1 and desired.favorite == known.favorite:
                                owed ^= 1
                            if owed & 2 and desired.rating == known.rating:
                                owed ^= 2
                            if owed & 4:
                                a, b = desired.play_state, known.play_state
                                if a is b or not play_states_differ(a, b):
                                    owed ^= 4
                            pruned_out = owed
                    if not owed:
                        continue
                    mask = _MASKS[owed]
                    if existing is not _ABSENT:
                        row_id = loaded_rows.get(tkey)  # (made again: the stored row's id)
                        if row_id is None:
                            self._unnumbered = True
                    elif self._early_ok and (not early or tkey > early[-1]):
                        # A new row in key order after the others made here: numbered now,
                        # as :meth:`_number` would at flush (checked there).
                        if not early:
                            self._early_first = next_id = self.tables.next_row_id()
                        row_id = next_id
                        next_id += 1
                        early.append(tkey)
                    else:
                        row_id = None
                        self._early_ok = False
                        self._unnumbered = True
                    rows[tkey] = _new_row(
                        WorkRow, (row_id, mask, desired, ms, wall, 0, 0, None, False)
                    )
                    row_peers.add(target)
                    dirty_rows[tkey] = None
                    queued[name] = mask
                if queued == last_queued:
                    queued = last_queued  # one dict for a run of the same (a bulk message's)
                else:
                    last_queued = queued
                append(
                    _new_row(
                        Applied,
                        (
                            obs,
                            changed_outcome if bits else unchanged,
                            _MASKS[bits],
                            first_contact,
                            _MASKS[moved],
                            stamp,
                            queued,
                        ),
                    )
                )
        finally:
            if clock_ms > clock.ms:
                clock.ms = clock_ms
        self._seen_high = high
        if ticked:
            self._clock_moved = True
        return results

    def apply(self, obs: Observation, key: Key) -> Applied:
        """Apply one observation to the working set (rules in :meth:`Ledger.apply_observations`)."""
        state = obs.state
        pending = self.echo.get(key, ())
        if obs.source == "event":
            seq = self.clock.next_ticket()
            if seq > self._seen_high:  # above every ticket seen: no look-up (see())
                self.seen[key] = self._seen_high = seq
            else:
                self.see(key, seq)
            if pending:  # no pending write: a change (classify_event's answer), nothing to prune
                verdict = classify_event(pending, state, self.lk.get(key), obs.wall_ms)
                if verdict.pending != pending:
                    self.echo[key] = pending = verdict.pending
                    self._dirty_echo[key] = None
                if verdict.verdict is Verdict.ECHO:
                    return _outcome(obs, Outcome.ECHO)
                if verdict.verdict is Verdict.AMBIGUOUS:
                    return _outcome(obs, Outcome.AMBIGUOUS)
        else:
            # A read: never applied over something learnt after it was requested.
            seq = self.clock.ticket() if obs.read_seq is None else obs.read_seq
            if self.seen_seq(key) > seq:
                return _outcome(obs, Outcome.OUTDATED)
            if obs.source != "scan":
                # Scans are bulk (a whole library): they are checked, not remembered. Events,
                # writes and the other reads of the same keys are what they race with.
                self.see(key, seq)
            if pending:  # else nothing to match, nothing made moot
                if obs.source == "scan":
                    # A page may show a write recorded after it was requested (an intent whose
                    # write landed first): jfsync's own, not the user's. Nothing is consumed.
                    verdict = match_echo(
                        pending, state, obs.wall_ms, consume=False, read_at_ms=obs.wall_ms
                    )
                    if verdict.verdict is Verdict.ECHO:
                        return _outcome(obs, Outcome.ECHO)
                    if verdict.verdict is Verdict.STALE:
                        return _outcome(obs, Outcome.STALE)
                moot = after_read(pending, state, obs.wall_ms, obs.wall_ms)
                if moot != pending:
                    self.echo[key] = pending = moot
                    self._dirty_echo[key] = None
        return self._merge_in(obs, key)

    def _merge_in(self, obs: Observation, key: Key) -> Applied:
        """The rest of :meth:`apply` once the echo rule and the read's ticket let ``obs`` in:
        the diff, the stamp, the merge, the new states and the outbox rows."""
        uid, iid, sid = key
        state = obs.state
        lk = self.lk
        previous = lk.get(key)
        canonical = self.canon.get((uid, iid))
        policy = self._policy_of(obs.user)  # the person's register choices
        if canonical is None and obs.server in policy.receive_only:
            # A receive-only server decides nothing: its state is only remembered.
            self.set_last_known(key, state)
            return _outcome(obs, Outcome.UNCHANGED)
        if previous is not None and canonical is not None:
            if previous is state or previous == state:
                return _outcome(obs, Outcome.UNCHANGED)
            if not changed_registers(policy.synced, previous, state):
                self.set_last_known(key, state)
                return _outcome(obs, Outcome.UNCHANGED)
        stamp = _new_row(Stamp, (self.tick(obs.wall_ms), self._tiebreak_of(obs.server)))
        seed_known = self._seed_sid is not None and (uid, iid, self._seed_sid) in lk
        result = merge(
            policy,
            canonical=canonical,
            last_known=previous,
            incoming=state,
            stamp=stamp,
            origin=obs.server,
            seed_known=seed_known,
        )
        desired = result.canonical
        # merge returns ``canonical`` itself when it did not move (any move changes a stamp).
        if desired is not canonical:
            self.canon[(uid, iid)] = desired
            self._dirty_canon[(uid, iid)] = None
        lk[key] = state
        self._dirty_lk[key] = None
        queued: dict[str, frozenset[Register]] = {}
        writes = result.writes
        rows = self.rows
        for target, name in self._targets_of(uid, sid):
            owed = writes.get(name, _NOTHING)
            tkey = (uid, iid, target)
            if rows.get(tkey) is None and (
                not owed or (target != sid and self.lacks_item(target, iid))
            ):
                continue
            if self.refresh_row(tkey, owed, desired.data, stamp.ms, obs.wall_ms):
                row = rows.get(tkey)
                queued[name] = row.mask if row is not None else _NOTHING
        return _new_row(
            Applied,
            (
                obs,
                Outcome.CHANGED if result.changed else Outcome.UNCHANGED,
                result.changed,
                result.first_contact,
                result.canonical_changed,
                stamp,
                queued,
            ),
        )

    def _policy_of(self, user: str) -> MergePolicy:
        """The merge policy of one person (:meth:`MergePolicy.for_user`), once per batch."""
        policy = self.policy
        if not policy.user_fields:
            return policy
        found = self._user_policies.get(user)
        if found is None:
            found = self._user_policies[user] = policy.for_user(user)
        return found

    def _profile_of(self, user: str) -> tuple[int, frozenset[str], bool]:
        """What the bulk path needs of one person's policy: the registers it syncs (bits),
        the receive-only servers and whether rewatch protection is on (once per batch)."""
        policy = self._policy_of(user)
        profile = (mask_bits(policy.synced), policy.receive_only, policy.rewatch_protection)
        self._profiles[user] = profile
        return profile

    def _row_targets_of(self, uid: int, sid: int) -> tuple[tuple[int, str, int, bool], ...]:
        """:meth:`_targets_of` for :meth:`apply_all`: each with the registers it may be owed
        for ``uid`` (bits, as :meth:`refresh_row` narrows them) and whether it is an indexed
        server other than the origin (owed only the items it maps)."""
        names = self.maps.names
        targets = tuple(
            (
                target,
                name,
                mask_bits(self.rules.synced_of(uid, names.get(target))),
                target != sid and target in self.indexed,
            )
            for target, name in self._targets_of(uid, sid)
        )
        self._row_targets[(uid, sid)] = targets
        return targets

    def _writes_of(self, server: str, moved: int, lost: int) -> dict[str, int]:
        """The registers (bits) each server is owed when ``server``'s observation moved the
        canonical value of ``moved`` and lost ``lost`` (:func:`writes_owed`)."""
        if not moved and not lost:
            owed: dict[str, int] = {}
        else:
            writes = writes_owed(self.policy, server, _MASKS[moved], _MASKS[lost])
            owed = {name: mask_bits(registers) for name, registers in writes.items()}
        self._writes[(server, moved, lost)] = owed
        return owed

    def _tiebreak_of(self, server: str) -> int:
        """The stamp tiebreak of changes ``server`` shows (:meth:`MergePolicy.stamp`)."""
        tiebreak = self._tiebreaks.get(server)
        if tiebreak is None:
            tiebreak = self._tiebreaks[server] = self.policy.stamp(0, server).tiebreak
        return tiebreak

    def _targets_of(self, uid: int, sid: int) -> tuple[tuple[int, str], ...]:
        """The configured servers (id, name) that may owe rows for ``uid``, origin ``sid``
        included, in id order."""
        targets = self._targets.get((uid, sid))
        if targets is None:
            names = self.maps.names
            ids = (self.members.get(uid, set()) | {sid}) & self._configured
            targets = self._targets[(uid, sid)] = tuple((t, names[t]) for t in sorted(ids))
        return targets

    def refresh_row(
        self,
        key: Key,
        owed: frozenset[Register],
        desired: UserData,
        version: int,
        now_ms: int,
    ) -> bool:
        """Merge ``owed`` into the row of ``key``, prune what the peer holds; tell if it moved."""
        existing = self.rows.get(key)
        mask = owed
        revive = False
        if existing is not None:
            mask = mask | existing.mask
            revive = existing.dead and bool(owed)
        mask = mask & self.rules.synced_of(key[0], self.maps.names.get(key[2]))  # choices
        known = self.lk.get(key)
        if known is not None and mask:
            held = [r for r in mask if desired.get(r) == known.get(r)]
            if held:
                mask = mask.difference(held)
        if not mask:
            if existing is None:
                return False
            self._dropping(existing)
            self.rows[key] = None
            self._dirty_rows[key] = None
            return True
        registers = mask
        if (
            existing is not None
            and not revive
            and existing.mask == registers
            and (
                existing.desired is desired
                or all(existing.desired.get(r) == desired.get(r) for r in registers)
            )
        ):
            return False
        if existing is not None and not revive:
            row = existing.owing(registers, desired, version)
        elif existing is not None:
            row = WorkRow(existing.id, registers, desired, version, existing.created_ms)
        else:
            row = WorkRow(self._loaded_rows.get(key), registers, desired, version, now_ms)
            if row.id is None:
                self._unnumbered = True
        self.rows[key] = row
        self._row_peers.add(key[2])
        self._dirty_rows[key] = None
        return True

    def flush(self) -> None:
        """Write every changed canonical state, last-known state, echo list and row.

        In key order: SQLite then walks each table's B-tree once, page after page, instead of
        jumping between pages at random.
        """
        tables = self.tables
        if self._dirty_canon:
            tables.put_canonical(_in_key_order(self.canon, self._dirty_canon))
        if self._dirty_lk:
            tables.put_last_known(_in_key_order(self.lk, self._dirty_lk))
        if self._dirty_echo:
            tables.put_echoes(_in_key_order(self.echo, self._dirty_echo))
        if self._dirty_rows:
            written = _in_key_order(self.rows, self._dirty_rows)
            self._number(written)
            tables.put_rows(written)
        if self._clock_moved:
            self.clock.save(tables.db)
        if self.seen:
            self.clock.note_seen(self.seen)

    def record_intents(
        self, key: Key, base: UserData, states: Sequence[UserData], wall_ms: int
    ) -> None:
        """Add ``states`` as pending echoes of ``key`` replacing ``base`` (writes ahead)."""
        pending = self.echo.get(key, ())
        base = interned(base)
        for state in states:
            pending = self.with_write(pending, interned(state), wall_ms, base)
        self.echo[key] = pending
        self._dirty_echo[key] = None

    def with_write(
        self,
        pending: tuple[PendingWrite, ...],
        state: UserData,
        wall_ms: int,
        replaced: UserData | None,
    ) -> tuple[PendingWrite, ...]:
        """``record_write(pending, state, wall_ms, replaced)``, made once per batch for the
        same objects (see :attr:`_echo_memo`)."""
        memo = (id(pending), id(state), wall_ms, id(replaced))
        hit = self._echo_memo.get(memo)
        if hit is not None:
            made = hit[-1]
        else:
            made = record_write(pending, state, wall_ms, replaced)
            self._echo_memo[memo] = (pending, state, replaced, made)
        return made  # type: ignore[return-value]

    def without(
        self, pending: tuple[PendingWrite, ...], state: UserData
    ) -> tuple[PendingWrite, ...]:
        """``pending`` without its entries of ``state``, once per batch for the same objects."""
        if not pending:
            return pending
        memo = (id(pending), id(state))
        hit = self._echo_memo.get(memo)
        if hit is not None:
            return hit[-1]  # type: ignore[return-value]
        kept = tuple(p for p in pending if p.state is not state and p.state != state)
        if len(kept) == len(pending):
            kept = pending
        self._echo_memo[memo] = (pending, state, kept)
        return kept

    def number_new_rows(self) -> None:
        """Give the rows created so far their ids (flush numbers the rest)."""
        self._number(_in_key_order(self.rows, self._dirty_rows))

    def _number(self, written: dict[Key, WorkRow | None]) -> None:
        """Number the unnumbered rows of ``written`` (the rows of some keys, in key order), in
        that order, in it and in the batch.

        The rows :meth:`apply_all` numbered as it made them keep their ids when those are what
        this numbering gives them (every other new row after them in key order, none of them
        dropped, the first id still free); else they are numbered again with the others.
        """
        early = self._early
        tables = self.tables
        if early:
            self._early = []
            ok, self._early_ok = self._early_ok, True
            unnumbered = _unnumbered(written) if self._unnumbered else []
            if ok and (not unnumbered or unnumbered[0][0] > early[-1]):
                # Every new row present (none of them dropped), in key order.
                first = tables.number_rows(len(early) + len(unnumbered))
                if first == self._early_first:
                    if unnumbered:
                        self._renumber(written, unnumbered, first + len(early))
                    return
            else:
                first = 0
            again = set(early)
            unnumbered = [
                (key, row)
                for key, row in written.items()
                if row is not None and (row.id is None or key in again)
            ]
            if first:  # the ids just reserved for them, as many
                self._renumber(written, unnumbered, first)
                return
        elif not self._unnumbered:
            return
        else:
            unnumbered = _unnumbered(written)
        if unnumbered:
            self._renumber(written, unnumbered, tables.number_rows(len(unnumbered)))

    def _renumber(
        self, written: dict[Key, WorkRow | None], rows: list[tuple[Key, WorkRow]], first: int
    ) -> None:
        """Give ``rows`` (in key order) the ids from ``first`` on, in ``written`` and the batch."""
        self._unnumbered = False
        numbered = {
            key: _new_row(WorkRow, (row_id, *row[1:]))
            for row_id, (key, row) in enumerate(rows, first)
        }
        written.update(numbered)  # (values replaced in place: the keys stay)
        self.rows.update(numbered)

    def _dropping(self, row: WorkRow) -> None:
        """``row`` leaves the batch: if :meth:`apply_all` numbered it, renumber at flush."""
        if self._early and row.id is not None and row.id >= self._early_first:
            self._early_ok = False

    def outbox_row(self, key: Key, like: OutboxRow) -> OutboxRow | None:
        """The row of ``key`` as it stands in this batch, named like ``like`` (or None):
        ``like`` itself when the row is still what it says (a compare that changed nothing)."""
        row = self.rows.get(key)
        return None if row is None else named_like(row, like)

    def written(self, key: Key, version: int, state: UserData, wall_ms: int) -> bool:
        """Record a write of ``state`` to the peer of ``key``; drop the row if still ``version``."""
        # Shared: a batch of acks mostly writes one state, whose later encodes, compares and
        # prunes then go by identity (each ack's state is a new object on the event loop).
        state = interned(state)
        lk = self.lk
        replaced = lk.get(key)
        lk[key] = state
        self._dirty_lk[key] = None
        self.see_write(key)
        # An intent recorded before the write (record_intents) is replaced by this entry: one
        # entry per echo, timed when the write completed (scans compare against that).
        pending = self.without(self.echo.get(key, ()), state)
        self.echo[key] = self.with_write(pending, state, wall_ms, replaced)
        self._dirty_echo[key] = None
        done = self._settle_row(key, version, state)
        # A change that came while the write was on its way may have moved the canonical
        # value back to what the peer held before it: its row was pruned then (nothing owed
        # to a peer already holding it), and the write has just undone that. Owe it again.
        canonical = self.canon.get(key[:2])
        if canonical is not None:
            data = canonical.data
            if data is not state and data != state:
                owed = frozenset(r for r in self.policy.synced if state.get(r) != data.get(r))
                if owed:
                    self.refresh_row(key, owed, data, self.tick(wall_ms), wall_ms)
        return done

    def see_many(self, keys: Iterable[Key], seq: int) -> None:
        """:meth:`see` of every key of ``keys`` at ``seq`` (a read of them all)."""
        seen = self.seen
        newer = self.clock.newer_than_seen((k for k in keys if seq > seen.get(k, 0)), seq)
        for key in newer:
            seen[key] = seq
        if newer and seq > self._seen_high:
            self._seen_high = seq

    def see_write(self, key: Key) -> None:
        """Record that a write to ``key`` was just acknowledged (a new ticket)."""
        # A ticket just taken is above every ticket handed out before: no look-up (see()).
        seq = self.clock.next_ticket()
        if seq > self._seen_high:
            self.seen[key] = self._seen_high = seq
        else:
            self.see(key, seq)

    def _settle_row(self, key: Key, version: int, state: UserData) -> bool:
        """Drop the row of ``key`` if still ``version``, else what ``state`` delivered of it."""
        row = self.rows.get(key)
        if row is None:
            return False
        if row.version == version:
            self._dropping(row)
            self.rows[key] = None
            self._dirty_rows[key] = None
            return True
        # Replaced mid-flight: keep what the write did not already deliver (same version, so
        # a pusher holding the newer row can still ack it).
        left = frozenset(r for r in row.mask if row.desired.get(r) != state.get(r))
        if not left:
            self._dropping(row)
            self.rows[key] = None
            self._dirty_rows[key] = None
        elif left != row.mask:
            self.rows[key] = row._replace(mask=left)  # (a key with a row: in _row_peers)
            self._dirty_rows[key] = None
        return False

    def set_last_known(self, key: Key, state: UserData) -> None:
        self.lk[key] = state
        self._dirty_lk[key] = None

    def tick(self, wall_ms: int) -> int:
        """Advance the hybrid clock and persist it with this batch."""
        self._clock_moved = True
        return self.clock.tick(wall_ms)
