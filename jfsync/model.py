"""Domain value types shared by every stage: user-data state, registers and stamps.

These are jfsync's own frozen, snake_case, unit-explicit types. Wire shapes (PascalCase,
Jellyfin's dates and ticks) live in :mod:`jfsync.jellyfin.wire` and are converted to these at
the boundary. Nothing here does I/O or reads a clock.

A user's data for one item is three registers, each last-writer-wins on its own:

* ``favorite``: bool;
* ``rating``: float 0-10 or None (cleared); Jellyfin's ``Likes`` derives from it;
* ``play_state``: (played, play_count, last_played_s, position_ticks), moved together so a server
  never shows played from one source and a resume position from another.

Dates are whole UTC seconds since the epoch (``*_s``): jfsync compares dates at 1 s resolution.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

#: Jellyfin ticks per second (1 tick = 100 ns).
TICKS_PER_SECOND = 10_000_000


class Register(enum.StrEnum):
    """One independently merged part of a user's data for an item."""

    FAVORITE = "favorite"
    RATING = "rating"
    PLAY_STATE = "play_state"


ALL_REGISTERS: tuple[Register, ...] = (Register.FAVORITE, Register.RATING, Register.PLAY_STATE)
_FAVORITE = Register.FAVORITE
_RATING = Register.RATING


@dataclass(frozen=True, slots=True)
class PlayState:
    """Played flag, play count, last played date and resume position, moved as one."""

    played: bool = False
    play_count: int = 0
    last_played_s: int | None = None
    position_ticks: int = 0

    def __eq__(self, other: object) -> bool:
        # The dataclass's own comparison (field tuples), with one thing first: a state is
        # equal to itself without building them (states are shared; compares run per item).
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, PlayState)
        return (self.played, self.play_count, self.last_played_s, self.position_ticks) == (
            other.played,
            other.play_count,
            other.last_played_s,
            other.position_ticks,
        )

    @property
    def is_default(self) -> bool:
        """Tell whether this is the state of an item never played."""
        return self == PlayState()


@dataclass(frozen=True, slots=True)
class UserData:
    """The synced user data of one user for one item on one server (or canonically)."""

    favorite: bool = False
    rating: float | None = None
    play_state: PlayState = PlayState()

    def __eq__(self, other: object) -> bool:
        # As PlayState's: the dataclass's comparison, a state equal to itself first.
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, UserData)
        return (self.favorite, self.rating, self.play_state) == (
            other.favorite,
            other.rating,
            other.play_state,
        )

    @property
    def is_default(self) -> bool:
        """Tell whether this equals the data of an item the user never touched."""
        return self == DEFAULT_USER_DATA

    def get(self, register: Register) -> bool | float | PlayState | None:
        """Return the value of one register."""
        # Module constants: this runs for every register of every state compared.
        if register is _FAVORITE:
            return self.favorite
        if register is _RATING:
            return self.rating
        return self.play_state

    def with_register(self, register: Register, value: bool | float | PlayState | None) -> UserData:
        """Return a copy with one register replaced by ``value``."""
        if register is _FAVORITE:
            assert isinstance(value, bool)
            return UserData(value, self.rating, self.play_state)
        if register is _RATING:
            assert value is None or isinstance(value, int | float)
            return UserData(self.favorite, None if value is None else float(value), self.play_state)
        assert isinstance(value, PlayState)
        return UserData(self.favorite, self.rating, value)

    def holds_data(self, registers: Iterable[Register]) -> bool:
        """Tell whether any of ``registers`` holds something but the default."""
        return any(self.get(r) != DEFAULT_USER_DATA.get(r) for r in registers)

    def changed_registers(self, other: UserData) -> frozenset[Register]:
        """Return the registers whose value differs between ``self`` and ``other``."""
        return frozenset(r for r in ALL_REGISTERS if self.get(r) != other.get(r))


DEFAULT_USER_DATA = UserData()

#: Interned states by value (see :func:`user_data`). Bounded: emptied when full.
_INTERNED: dict[tuple[Any, ...], UserData] = {}
_INTERNED_MAX = 4096


def user_data(
    favorite: bool,
    rating: float | None,
    played: bool,
    play_count: int,
    last_played_s: int | None,
    position_ticks: int,
) -> UserData:
    """Build a :class:`UserData`, sharing one object per distinct value.

    States are immutable and few distinct ones recur (the defaults, a season marked played
    at once), so decoders that build thousands of them return shared objects instead.
    """
    key = (favorite, rating, played, play_count, last_played_s, position_ticks)
    state = _INTERNED.get(key)
    if state is None:
        if len(_INTERNED) >= _INTERNED_MAX:
            _INTERNED.clear()
        state = _INTERNED[key] = UserData(
            favorite, rating, PlayState(played, play_count, last_played_s, position_ticks)
        )
    return state


def user_data_of(values: tuple[Any, ...]) -> UserData:
    """:func:`user_data` of ``(favorite, rating, played, play_count, last_played_s,
    position_ticks)`` as a database row holds them (0/1 for the flags, a float or None for the
    rating): one look-up when the state is shared already (0 and 1 are equal to, and hash like,
    False and True, so the row's values find the shared state whose flags are bools)."""
    found = _INTERNED.get(values)
    if found is not None:
        return found
    favorite, rating, played, play_count, last_played_s, position_ticks = values
    return user_data(
        bool(favorite),
        None if rating is None else float(rating),
        bool(played),
        int(play_count),
        None if last_played_s is None else int(last_played_s),
        int(position_ticks),
    )


def interned(state: UserData) -> UserData:
    """``state``, or the equal state :func:`user_data` already shares (then ``state`` joins
    the shared ones). States that enter the ledger from a peer's listing or a write are new
    objects each; shared, each run of one value is encoded and compared once, by identity.
    A state holding an int rating or favourite is left alone (it would match, and stand for,
    the float and bool ones :func:`user_data` makes)."""
    favorite, rating = state.favorite, state.rating
    if favorite.__class__ is not bool or (rating is not None and rating.__class__ is not float):
        return state
    ps = state.play_state
    key = (
        favorite,
        rating,
        ps.played,
        ps.play_count,
        ps.last_played_s,
        ps.position_ticks,
    )
    found = _INTERNED.get(key)
    if found is None:
        if len(_INTERNED) >= _INTERNED_MAX:
            _INTERNED.clear()
        found = _INTERNED[key] = state
    return found


class Stamp(NamedTuple):
    """When jfsync observed a change: hybrid-clock milliseconds, ties broken by server rank.

    Ordering is (ms, server_rank): a lower rank (earlier in the config) wins a tie by sorting
    *later*, so it is stored inverted in ``tiebreak``.

    A named tuple (compared, ordered and hashed as ``(ms, tiebreak)``): the ledger keeps one
    per register of every cached state, and a tuple of plain numbers is dropped from the
    cyclic garbage collector's sight the first time it looks at it, where a slotted object is
    walked again by every collection of its generation.
    """

    ms: int
    tiebreak: int = 0

    @classmethod
    def observed(cls, ms: int, server_rank: int) -> Stamp:
        """Build the stamp of a change seen at ``ms`` on the server at ``server_rank``."""
        return cls(ms, -server_rank)


_new_tuple = tuple.__new__


def new_stamp(ms: int, tiebreak: int) -> Stamp:
    """``Stamp(ms, tiebreak)``, built without the named tuple's ``__new__`` (a call less; the
    bulk apply builds one stamp per observation)."""
    return _new_tuple(Stamp, (ms, tiebreak))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def datetime_to_s(value: datetime | None) -> int | None:
    """Floor an aware datetime to whole UTC seconds since the epoch (exact integer arithmetic).

    Not ``int(value.timestamp())``: the float rounds 9999-12-31T23:59:59.999999 up to a year
    10000 no datetime can hold, and ``int`` moves dates before 1970 forward, not down.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _SECOND


def s_to_datetime(value: int | None) -> datetime | None:
    """Return whole UTC seconds as an aware datetime."""
    if value is None:
        return None
    return datetime.fromtimestamp(value, tz=UTC)
