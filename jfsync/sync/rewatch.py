"""Rewatch protection: a played item un-played by starting it again is not spread as an un-play.

Up to Jellyfin 10.11, starting a played, resumable item saves ``Played=false`` with
``PlayCount + 1`` and ``LastPlayedDate = now`` (and pushes it), and stopping before the end
leaves it that way (fact sheet §3 and Corrections 3; Jellyfin issues 7535 and 14351). From
12.0 a start keeps ``Played``. Replicated literally, every rewatch on a 10.x server un-plays
the item on every other server.

The rule (pure; :func:`jfsync.sync.merge.merge` applies it to a known server's play-state
change when :attr:`~jfsync.sync.merge.MergePolicy.rewatch_protection` is on): when the
canonical play state is played and a server shows it *unplayed with a play count above 0*,
the un-play came from playback, not from the user: an explicit "mark unplayed" sets
``PlayCount = 0`` and clears the date (§4.1). Such a state is taken with ``Played`` kept true:
its play count, last played date and resume position are taken as they are, which is exactly
what a 12.0 server shows for the same rewatch. The server that shows it is not written back
(its player is still using it); the other servers keep showing the item played, with the
resume position, so "continue on the other server" still works. The rewatch ends when that
server shows the item played again (finished: taken as it is) or unplayed with play count 0
(the user's explicit un-play: spread as it is).
"""

from __future__ import annotations

from jfsync.model import PlayState


def is_playback_unplay(canonical: PlayState, incoming: PlayState) -> bool:
    """Tell whether ``incoming`` un-plays a played item through playback (a rewatch).

    True when the canonical state is played and ``incoming`` is unplayed with a play count
    above 0 and a last played date no older than the canonical one (a start sets it to now);
    an explicit "mark unplayed" (play count 0, no date) never is.
    """
    if not canonical.played or incoming.played or incoming.play_count <= 0:
        return False
    started = incoming.last_played_s
    if started is None:
        return False
    return canonical.last_played_s is None or started >= canonical.last_played_s


def protected(canonical: PlayState, incoming: PlayState) -> PlayState:
    """Return the play state to spread for ``incoming``: played kept during a rewatch.

    Anything but a playback un-play (:func:`is_playback_unplay`) is returned unchanged.
    """
    if not is_playback_unplay(canonical, incoming):
        return incoming
    return PlayState(
        played=True,
        play_count=incoming.play_count,
        last_played_s=incoming.last_played_s,
        position_ticks=incoming.position_ticks,
    )
