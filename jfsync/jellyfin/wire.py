"""Pydantic models of the JSON Jellyfin sends and accepts, and their conversion to domain types.

Wire models keep Jellyfin's PascalCase (via aliases), ignore unknown fields and tolerate missing
optional ones. Ids are normalised to 32 lowercase hex at parse time. Dates without a zone are
read as UTC. :func:`format_date` writes dates the way Jellyfin does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from jfsync.ids import normalize_id
from jfsync.model import PlayState, UserData, datetime_to_s

#: A Jellyfin Guid, normalised to 32 lowercase hex.
JfId = Annotated[str, AfterValidator(normalize_id)]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A Jellyfin date, always timezone-aware UTC.
JfDate = Annotated[datetime, AfterValidator(_utc)]


class WireModel(BaseModel):
    """Base for wire models: PascalCase aliases, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class UserItemDataDto(WireModel):
    """``UserItemDataDto``: one user's data for one item, as REST and websocket send it."""

    rating: float | None = Field(default=None, alias="Rating")
    played_percentage: float | None = Field(default=None, alias="PlayedPercentage")
    unplayed_item_count: int | None = Field(default=None, alias="UnplayedItemCount")
    playback_position_ticks: int = Field(default=0, alias="PlaybackPositionTicks")
    play_count: int = Field(default=0, alias="PlayCount")
    is_favorite: bool = Field(default=False, alias="IsFavorite")
    likes: bool | None = Field(default=None, alias="Likes")
    last_played_date: JfDate | None = Field(default=None, alias="LastPlayedDate")
    played: bool = Field(default=False, alias="Played")
    key: str | None = Field(default=None, alias="Key")
    item_id: JfId | None = Field(default=None, alias="ItemId")

    def to_user_data(self) -> UserData:
        """Convert to jfsync's domain value (dates truncated to whole seconds)."""
        return UserData(
            favorite=self.is_favorite,
            rating=self.rating,
            play_state=PlayState(
                played=self.played,
                play_count=self.play_count,
                last_played_s=datetime_to_s(self.last_played_date),
                position_ticks=self.playback_position_ticks,
            ),
        )


def format_date(value: datetime) -> str:
    """Write a date as Jellyfin does: UTC, ISO 8601, seven fractional digits, ``Z``."""
    value = _utc(value)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond:06d}0Z"


def update_body(desired: UserData, fields: frozenset[str] | None = None) -> dict[str, Any]:
    """Build an ``UpdateUserItemDataDto`` body that sets the given registers of ``desired``.

    ``fields`` limits the body to some registers (``favorite``, ``rating``, ``play_state``);
    by default all are included. A null rating or null last played date cannot be written
    through this body (Jellyfin reads null as "leave unchanged"): callers clear those with the
    DELETE routes.
    """
    wanted = fields if fields is not None else frozenset({"favorite", "rating", "play_state"})
    body: dict[str, Any] = {}
    if "favorite" in wanted:
        body["IsFavorite"] = desired.favorite
    if "rating" in wanted and desired.rating is not None:
        body["Rating"] = desired.rating
    if "play_state" in wanted:
        state = desired.play_state
        body["Played"] = state.played
        body["PlayCount"] = state.play_count
        body["PlaybackPositionTicks"] = state.position_ticks
        if state.last_played_s is not None:
            body["LastPlayedDate"] = format_date(datetime.fromtimestamp(state.last_played_s, UTC))
    return body
