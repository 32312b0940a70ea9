"""The write plan: which requests make a Jellyfin server hold some registers of a user's data.

:func:`plan_write` is a pure function (no I/O, no clock) from the state the server holds, the
state wanted and the registers to bring over, to the requests to send, in order, each with the
state the server holds after it. :meth:`jfsync.jellyfin.api.JellyfinClient.apply_user_data`
sends them; the pusher (:mod:`jfsync.sync.delivery`) records the states after each one as the
write's intents before sending, so an interrupted or half-done write is known as jfsync's own.

Facts behind it (protocol sheet §4, the same on 10.9, 10.10, 10.11 and 12): ``POST
/UserItems/{itemId}/UserData`` copies only the fields present in its body and reads null as
"leave unchanged", so it can set favourite, rating, played, play count, position and last played
date exactly but clear neither the rating nor the date. A rating going to none takes ``DELETE
/UserItems/{itemId}/Rating``; a last played date going to none takes ``DELETE
/UserPlayedItems/{itemId}`` (MarkUnplayed: not played, count 0, position 0, no date), after
which the POST sets whatever of the play state still differs (a count kept, a position). ``POST
/UserPlayedItems`` is never used: it bumps the play count and recurses into folders. 10.8 has no
route that sets a count, a date or a position exactly, so the client refuses servers before
10.9 (:data:`jfsync.jellyfin.api.MIN_SUPPORTED_VERSION`). The play state is one register: its
four fields are always sent together, so a server never shows the count of one write and the
position of another.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

from jfsync.jellyfin.wire import update_body
from jfsync.model import PlayState, Register, UserData

#: POST writes only the fields in its body (``UpdateUserItemDataDto``, 10.9+); GET reads.
USER_DATA_ROUTE = "/UserItems/{itemId}/UserData"
#: Sets the rating to none.
CLEAR_RATING_ROUTE = "/UserItems/{itemId}/Rating"
#: MarkUnplayed: not played, play count 0, position 0, no last played date.
MARK_UNPLAYED_ROUTE = "/UserPlayedItems/{itemId}"
#: Plans remembered: a burst writes the same few (before, after) pairs thousands of times.
PLAN_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One request of a write, and what the server holds once it is answered."""

    method: str
    #: The route template; ``{itemId}`` is the server's item id, ``userId`` goes in the query.
    route: str
    #: The registers this request changes.
    sets: frozenset[Register]
    #: The server's state of the item after this request.
    after: UserData
    #: The encoded JSON body (the POST only).
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class WritePlan:
    """The requests that bring some registers of a server's state to the wanted values."""

    requests: tuple[WriteRequest, ...]
    #: The server's state once every request is answered (the state before when none is).
    result: UserData

    @property
    def steps(self) -> tuple[UserData, ...]:
        """The server's state after each request, in order."""
        return tuple(request.after for request in self.requests)

    @property
    def nothing_to_send(self) -> bool:
        """Tell whether the server already holds every register asked for."""
        return not self.requests


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def plan_write(current: UserData, desired: UserData, registers: frozenset[Register]) -> WritePlan:
    """Plan the requests that make ``registers`` of ``current`` hold their ``desired`` values.

    Registers not asked for are left as they are, whatever ``desired`` holds for them. Dates
    compare at 1 s (the resolution of :class:`jfsync.model.PlayState`). Nothing is planned
    when ``current`` already holds them; otherwise at most one DELETE of the rating, one
    DELETE of the played state and one POST of the registers that still differ, in that order.
    """
    state = current
    requests: list[WriteRequest] = []
    if Register.RATING in registers and desired.rating is None and state.rating is not None:
        state = replace(state, rating=None)
        requests.append(
            WriteRequest("DELETE", CLEAR_RATING_ROUTE, frozenset({Register.RATING}), state)
        )
    if (
        Register.PLAY_STATE in registers
        and desired.play_state.last_played_s is None
        and state.play_state.last_played_s is not None
    ):
        state = replace(state, play_state=PlayState())
        requests.append(
            WriteRequest("DELETE", MARK_UNPLAYED_ROUTE, frozenset({Register.PLAY_STATE}), state)
        )
    still = frozenset(r for r in registers if desired.get(r) != state.get(r))
    if still:
        for register in still:
            state = state.with_register(register, desired.get(register))
        body = update_body(state, still)
        requests.append(
            WriteRequest("POST", USER_DATA_ROUTE, still, state, json.dumps(body).encode())
        )
    return WritePlan(tuple(requests), state)


__all__ = [
    "CLEAR_RATING_ROUTE",
    "MARK_UNPLAYED_ROUTE",
    "USER_DATA_ROUTE",
    "WritePlan",
    "WriteRequest",
    "plan_write",
]
