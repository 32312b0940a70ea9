"""Pydantic models of the JSON Jellyfin sends and accepts, and their conversion to domain types.

Wire models keep Jellyfin's PascalCase (via aliases), ignore unknown fields and tolerate missing
optional ones. Ids are normalised to 32 lowercase hex at parse time. Dates without a zone are
read as UTC. :func:`format_date` writes dates the way Jellyfin does. Models holding credentials
(``AuthenticationResult``, ``QuickConnectResult``) keep them out of their repr.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Required, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from typing_extensions import TypedDict

from jfsync.ids import normalize_id
from jfsync.model import UserData, datetime_to_s, user_data

#: A Jellyfin Guid, normalised to 32 lowercase hex.
JfId = Annotated[str, AfterValidator(normalize_id)]


def _utc(value: datetime) -> datetime:
    zone = value.tzinfo
    if zone is UTC:
        return value
    return value.replace(tzinfo=UTC) if zone is None else value.astimezone(UTC)


#: A Jellyfin date, always timezone-aware UTC.
JfDate = Annotated[datetime, AfterValidator(_utc)]
#: A .NET ``long``: what SQLite can store, so a hostile number cannot break the ledger.
JfLong = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
#: A .NET ``double`` as Jellyfin writes it: finite (a NaN never equals itself, so a NaN
#: rating would look changed forever and be written back and forth).
JfDouble = Annotated[float, Field(allow_inf_nan=False)]


class WireModel(BaseModel):
    """Base for wire models: PascalCase aliases, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class UserItemDataDto(WireModel):
    """``UserItemDataDto``: one user's data for one item, as REST and websocket send it."""

    rating: JfDouble | None = Field(default=None, alias="Rating")
    played_percentage: float | None = Field(default=None, alias="PlayedPercentage")
    unplayed_item_count: JfLong | None = Field(default=None, alias="UnplayedItemCount")
    playback_position_ticks: JfLong = Field(default=0, alias="PlaybackPositionTicks")
    play_count: JfLong = Field(default=0, alias="PlayCount")
    is_favorite: bool = Field(default=False, alias="IsFavorite")
    likes: bool | None = Field(default=None, alias="Likes")
    last_played_date: JfDate | None = Field(default=None, alias="LastPlayedDate")
    played: bool = Field(default=False, alias="Played")
    key: str | None = Field(default=None, alias="Key")
    item_id: JfId | None = Field(default=None, alias="ItemId")

    def to_user_data(self) -> UserData:
        """Convert to jfsync's domain value (dates truncated to whole seconds)."""
        return user_data(
            self.is_favorite,
            self.rating,
            self.played,
            self.play_count,
            datetime_to_s(self.last_played_date),
            self.playback_position_ticks,
        )


def format_date(value: datetime) -> str:
    """Write a date as Jellyfin does: UTC, ISO 8601, seven fractional digits, ``Z``."""
    value = _utc(value)
    # Not strftime: its %Y writes year 1 (.NET's DateTime.MinValue) as "1", not "0001".
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}0Z"
    )


@functools.lru_cache(maxsize=1024)
def _format_s(seconds: int) -> str:
    """:func:`format_date` of whole UTC seconds (a burst writes the same date many times)."""
    return format_date(datetime.fromtimestamp(seconds, UTC))


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
            body["LastPlayedDate"] = _format_s(state.last_played_s)
    return body


# --------------------------------------------------------------------------- read models


def _provider_ids(value: object) -> object:
    """Drop null and empty provider ids (Jellyfin sends ``{"Tvdb": null}`` at times)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items() if v is not None and str(v) != ""}
    return value


#: ``ProviderIds``: provider name to id, without empty entries.
ProviderIds = Annotated[dict[str, str], BeforeValidator(_provider_ids)]


class PublicSystemInfo(WireModel):
    """``PublicSystemInfo`` from the anonymous ``GET /System/Info/Public``."""

    local_address: str | None = Field(default=None, alias="LocalAddress")
    server_name: str | None = Field(default=None, alias="ServerName")
    version: str | None = Field(default=None, alias="Version")
    product_name: str | None = Field(default=None, alias="ProductName")
    id: JfId | None = Field(default=None, alias="Id")
    startup_wizard_completed: bool | None = Field(default=None, alias="StartupWizardCompleted")


class SystemInfo(PublicSystemInfo):
    """``SystemInfo`` from the authenticated ``GET /System/Info`` (the fields jfsync reads)."""

    operating_system_display_name: str | None = Field(
        default=None, alias="OperatingSystemDisplayName"
    )
    has_pending_restart: bool | None = Field(default=None, alias="HasPendingRestart")
    is_shutting_down: bool | None = Field(default=None, alias="IsShuttingDown")


class UserPolicy(WireModel):
    """``UserPolicy``: the flags jfsync cares about."""

    is_administrator: bool = Field(default=False, alias="IsAdministrator")
    is_hidden: bool = Field(default=False, alias="IsHidden")
    is_disabled: bool = Field(default=False, alias="IsDisabled")


class UserDto(WireModel):
    """``UserDto``: one account on a server."""

    name: str = Field(alias="Name")
    id: JfId = Field(alias="Id")
    server_id: str | None = Field(default=None, alias="ServerId")
    has_password: bool | None = Field(default=None, alias="HasPassword")
    policy: UserPolicy = Field(default_factory=UserPolicy, alias="Policy")

    @property
    def is_admin(self) -> bool:
        """Tell whether the user is an administrator."""
        return self.policy.is_administrator

    @property
    def is_disabled(self) -> bool:
        """Tell whether the account is disabled (it cannot log in or be written for)."""
        return self.policy.is_disabled


class BaseItemDto(WireModel):
    """``BaseItemDto``: one library item with the fields jfsync uses to match and sync it."""

    id: JfId = Field(alias="Id")
    name: str | None = Field(default=None, alias="Name")
    type: str | None = Field(default=None, alias="Type")
    path: str | None = Field(default=None, alias="Path")
    provider_ids: ProviderIds = Field(default_factory=dict, alias="ProviderIds")
    production_year: int | None = Field(default=None, alias="ProductionYear")
    series_id: JfId | None = Field(default=None, alias="SeriesId")
    series_name: str | None = Field(default=None, alias="SeriesName")
    season_id: JfId | None = Field(default=None, alias="SeasonId")
    index_number: int | None = Field(default=None, alias="IndexNumber")
    parent_index_number: int | None = Field(default=None, alias="ParentIndexNumber")
    parent_id: JfId | None = Field(default=None, alias="ParentId")
    is_folder: bool | None = Field(default=None, alias="IsFolder")
    run_time_ticks: int | None = Field(default=None, alias="RunTimeTicks")
    user_data: UserItemDataDto | None = Field(default=None, alias="UserData")


class ListedUserData(TypedDict, total=False):
    """The registers of a listed item's ``UserData``, as a user-data read needs them.

    A typed dict, validated to the same rules as :class:`UserItemDataDto` (the same types,
    null only where that model takes it, unknown keys ignored) but built with no model per
    item: the pusher reads its peer's state of every item it writes, ten thousand for a bulk
    action. :func:`listed_user_data` turns it into the domain value.
    """

    Rating: JfDouble | None
    PlaybackPositionTicks: JfLong
    PlayCount: JfLong
    IsFavorite: bool
    #: Not :data:`JfDate`: whole UTC seconds are taken of it as sent, a date without a zone
    #: as UTC (:func:`jfsync.model.datetime_to_s`), with no validator called per item.
    LastPlayedDate: datetime | None
    Played: bool


class ListedItem(TypedDict, total=False):
    """A listed item as a user-data read needs it: its id and the user's data, nothing else
    (the other fields of the ``BaseItemDto`` are skipped, not validated)."""

    Id: Required[JfId]
    UserData: ListedUserData | None


class ListedPage(TypedDict, total=False):
    """A listing page (``QueryResult``) read for its items' user data only."""

    Items: list[ListedItem]


def listed_user_data(data: ListedUserData) -> UserData:
    """The domain value of a listed item's user data (as :meth:`UserItemDataDto.to_user_data`,
    missing keys taking that model's defaults)."""
    return user_data(
        data.get("IsFavorite", False),
        data.get("Rating"),
        data.get("Played", False),
        data.get("PlayCount", 0),
        datetime_to_s(data.get("LastPlayedDate")),
        data.get("PlaybackPositionTicks", 0),
    )


class VirtualFolderInfo(WireModel):
    """``VirtualFolderInfo`` of ``/Library/VirtualFolders``: one library of the server."""

    name: str = Field(alias="Name")
    item_id: JfId | None = Field(default=None, alias="ItemId")
    locations: list[str] = Field(default_factory=list, alias="Locations")
    collection_type: str | None = Field(default=None, alias="CollectionType")


ItemT = TypeVar("ItemT", bound=BaseModel)


class QueryResult(WireModel, Generic[ItemT]):
    """``QueryResult``: one page of a listing."""

    items: list[ItemT] = Field(default_factory=list, alias="Items")
    total_record_count: int | None = Field(default=None, alias="TotalRecordCount")
    start_index: int = Field(default=0, alias="StartIndex")


class AuthenticationResult(WireModel):
    """``AuthenticationResult`` from a login; the access token never shows in the repr."""

    user: UserDto | None = Field(default=None, alias="User")
    access_token: str | None = Field(default=None, alias="AccessToken", repr=False)
    server_id: str | None = Field(default=None, alias="ServerId")


class QuickConnectResult(WireModel):
    """``QuickConnectResult`` of ``/QuickConnect/Initiate``; secret and code stay out of reprs."""

    authenticated: bool = Field(default=False, alias="Authenticated")
    secret: str = Field(alias="Secret", repr=False)
    code: str = Field(alias="Code", repr=False)
    device_id: str | None = Field(default=None, alias="DeviceId")
    app_name: str | None = Field(default=None, alias="AppName")
