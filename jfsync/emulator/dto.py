"""JSON bodies the emulated server writes, shaped as Jellyfin writes them for each version.

PascalCase keys, nulls omitted, Guids as 32 hex, enums as strings, dates in Jellyfin's
``yyyy-MM-ddTHH:mm:ss.fffffffZ`` form (fact sheet §1.3). Every builder here produces a body that
validates against the emulated version's official OpenAPI schema (checked by the conformance
tests), so only fields that version's schema declares are written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jfsync.emulator.library import LibraryItem
from jfsync.emulator.state import (
    ApiKey,
    EmuUser,
    ServerVersion,
    StoredUserData,
    utc_from_ms,
)
from jfsync.jellyfin.wire import format_date

#: What ``/System/Ping`` and ``ProductName`` say.
PRODUCT_NAME = "Jellyfin Server"
#: .NET ``DateTime.MinValue`` as Jellyfin writes it (non-nullable dates never set).
MIN_DATE = "0001-01-01T00:00:00.0000000Z"

_AUTH_PROVIDER = "Jellyfin.Server.Implementations.Users.DefaultAuthenticationProvider"
_RESET_PROVIDER = "Jellyfin.Server.Implementations.Users.DefaultPasswordResetProvider"


def number(value: float) -> float | int:
    """Write whole doubles as integers, as .NET's JSON writer does (10, not 10.0)."""
    return int(value) if float(value).is_integer() else value


def date_ms(ms: int) -> str:
    """Format epoch milliseconds as a Jellyfin date."""
    return format_date(utc_from_ms(ms))


def user_data_dto(
    data: StoredUserData,
    item: LibraryItem,
    *,
    item_id: str | None,
    unplayed: int | None = None,
    recursive_count: int | None = None,
) -> dict[str, Any]:
    """Build a ``UserItemDataDto`` (declared field order).

    ``unplayed`` is set for folders that take their played state from their leaves (series,
    seasons, plain folders); ``recursive_count`` is their leaf count when the item DTO asked
    for ``RecursiveItemCount``. ``Folder.FillUserDataDtoValues`` then writes ``PlayedPercentage
    = 100 - unplayed/total*100`` and ``Played = PlayedPercentage >= 100``; without a count (or
    with none) ``Played = UnplayedItemCount == 0`` and no percentage.
    """
    dto: dict[str, Any] = {}
    if data.rating is not None:
        dto["Rating"] = number(data.rating)
    played = data.played
    if unplayed is not None:
        if recursive_count:
            percentage = 100.0 - 100.0 * unplayed / recursive_count
            dto["PlayedPercentage"] = number(percentage)
            played = percentage >= 100
        else:
            played = unplayed == 0
    elif data.position_ticks > 0 and item.run_time_ticks and item.run_time_ticks > 0:
        dto["PlayedPercentage"] = number(100.0 * data.position_ticks / item.run_time_ticks)
    if unplayed is not None:
        dto["UnplayedItemCount"] = unplayed
    dto["PlaybackPositionTicks"] = data.position_ticks
    dto["PlayCount"] = data.play_count
    dto["IsFavorite"] = data.is_favorite
    if data.likes is not None:
        dto["Likes"] = data.likes
    if data.last_played is not None:
        dto["LastPlayedDate"] = format_date(data.last_played)
    dto["Played"] = played
    dto["Key"] = item.user_data_key
    if item_id is not None:
        dto["ItemId"] = item_id
    return dto


def item_dto(
    item: LibraryItem,
    *,
    server_id: str,
    fields: frozenset[str],
    user_data: dict[str, Any] | None,
    enable_images: bool,
    child_count: int | None = None,
    recursive_item_count: int | None = None,
) -> dict[str, Any]:
    """Build a ``BaseItemDto`` with the always-present fields and the requested ones (§5.2)."""
    dto: dict[str, Any] = {"Name": item.name, "ServerId": server_id, "Id": item.id}
    if "path" in fields:
        dto["Path"] = item.path
    if "datecreated" in fields:
        dto["DateCreated"] = format_date(datetime.fromtimestamp(item.created_s, UTC))
    if "sortname" in fields:
        dto["SortName"] = item.sort_name
    if item.year is not None and item.type != "CollectionFolder":
        dto["PremiereDate"] = format_date(datetime(item.year, 1, 1, tzinfo=UTC))
        dto["ProductionYear"] = item.year
    if "providerids" in fields:
        dto["ProviderIds"] = dict(item.provider_ids)
    dto["IsFolder"] = item.is_folder
    if item.index_number is not None:
        dto["IndexNumber"] = item.index_number
    if item.parent_index_number is not None:
        dto["ParentIndexNumber"] = item.parent_index_number
    if "parentid" in fields and item.parent_id is not None:
        dto["ParentId"] = item.parent_id
    dto["Type"] = item.type
    if item.collection_type is not None:
        dto["CollectionType"] = item.collection_type
    if item.series_name is not None:
        dto["SeriesName"] = item.series_name
    if item.series_id is not None:
        dto["SeriesId"] = item.series_id
    if item.season_id is not None:
        dto["SeasonId"] = item.season_id
    if item.season_name is not None:
        dto["SeasonName"] = item.season_name
    if item.run_time_ticks is not None:
        dto["RunTimeTicks"] = item.run_time_ticks
    if user_data is not None:
        dto["UserData"] = user_data
    if recursive_item_count is not None:
        dto["RecursiveItemCount"] = recursive_item_count
    if child_count is not None and "childcount" in fields:
        dto["ChildCount"] = child_count
    if enable_images:
        dto["ImageTags"] = {}
        dto["BackdropImageTags"] = []
    dto["LocationType"] = "FileSystem"
    dto["MediaType"] = "Video" if item.is_leaf else "Unknown"
    return dto


def user_dto(
    user: EmuUser, *, server_id: str, server_name: str, version: ServerVersion
) -> dict[str, Any]:
    """Build a ``UserDto`` with default configuration and policy for that version."""
    dto: dict[str, Any] = {
        "Name": user.name,
        "ServerId": server_id,
        "ServerName": server_name,
        "Id": user.id,
        "HasPassword": bool(user.password),
        "HasConfiguredPassword": bool(user.password),
        "HasConfiguredEasyPassword": False,
        "EnableAutoLogin": False,
    }
    if user.last_login_ms is not None:
        dto["LastLoginDate"] = date_ms(user.last_login_ms)
    if user.last_activity_ms is not None:
        dto["LastActivityDate"] = date_ms(user.last_activity_ms)
    dto["Configuration"] = _user_configuration()
    dto["Policy"] = _user_policy(user, version)
    return dto


def _user_configuration() -> dict[str, Any]:
    return {
        "PlayDefaultAudioTrack": True,
        "SubtitleLanguagePreference": "",
        "DisplayMissingEpisodes": False,
        "GroupedFolders": [],
        "SubtitleMode": "Default",
        "DisplayCollectionsView": False,
        "EnableLocalPassword": False,
        "OrderedViews": [],
        "LatestItemsExcludes": [],
        "MyMediaExcludes": [],
        "HidePlayedInLatest": True,
        "RememberAudioSelections": True,
        "RememberSubtitleSelections": True,
        "EnableNextEpisodeAutoPlay": True,
    }


def _user_policy(user: EmuUser, version: ServerVersion) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "IsAdministrator": user.is_admin,
        "IsHidden": user.is_hidden,
        "IsDisabled": user.is_disabled,
        "BlockedTags": [],
        "EnableUserPreferenceAccess": True,
        "AccessSchedules": [],
        "BlockUnratedItems": [],
        "EnableRemoteControlOfOtherUsers": user.is_admin,
        "EnableSharedDeviceControl": True,
        "EnableRemoteAccess": True,
        "EnableLiveTvManagement": user.is_admin,
        "EnableLiveTvAccess": True,
        "EnableMediaPlayback": True,
        "EnableAudioPlaybackTranscoding": True,
        "EnableVideoPlaybackTranscoding": True,
        "EnablePlaybackRemuxing": True,
        "ForceRemoteSourceTranscoding": False,
        "EnableContentDeletion": user.is_admin,
        "EnableContentDeletionFromFolders": [],
        "EnableContentDownloading": True,
        "EnableSyncTranscoding": True,
        "EnableMediaConversion": True,
        "EnabledDevices": [],
        "EnableAllDevices": True,
        "EnabledChannels": [],
        "EnableAllChannels": True,
        "EnabledFolders": [],
        "EnableAllFolders": True,
        "InvalidLoginAttemptCount": 0,
        "LoginAttemptsBeforeLockout": -1,
        "MaxActiveSessions": 0,
        "EnablePublicSharing": True,
        "BlockedMediaFolders": [],
        "BlockedChannels": [],
        "RemoteClientBitrateLimit": 0,
        "AuthenticationProviderId": _AUTH_PROVIDER,
        "PasswordResetProviderId": _RESET_PROVIDER,
        "SyncPlayAccess": "CreateAndJoinGroups",
    }
    if version.at_least(10, 9):
        policy["EnableCollectionManagement"] = user.is_admin
        policy["EnableSubtitleManagement"] = user.is_admin
        policy["AllowedTags"] = []
    if version.at_least(10, 10):
        policy["EnableLyricManagement"] = user.is_admin
    return policy


def session_dto(
    *,
    session_id: str,
    user: EmuUser | None,
    client: str,
    device_id: str,
    device_name: str,
    app_version: str,
    last_activity_ms: int,
    additional_users: list[EmuUser],
    server_id: str,
    version: ServerVersion,
    now_playing: dict[str, Any] | None = None,
    position_ticks: int | None = None,
    is_paused: bool = False,
    play_method: str | None = None,
    last_checkin_ms: int | None = None,
    playable_media_types: list[str] | None = None,
    supported_commands: list[str] | None = None,
    supports_media_control: bool = False,
) -> dict[str, Any]:
    """Build a ``SessionInfoDto`` (``SessionInfo`` on 10.8) for login answers and /Sessions.

    While something plays, ``NowPlayingItem`` is its item DTO and ``PlayState`` carries the
    last reported position; ``LastPlaybackCheckIn`` is the last playback report.
    """
    play_state: dict[str, Any] = {}
    if now_playing is not None and position_ticks is not None:
        play_state["PositionTicks"] = position_ticks
    play_state.update(
        {
            "CanSeek": now_playing is not None,
            "IsPaused": is_paused,
            "IsMuted": False,
        }
    )
    if now_playing is not None and play_method is not None:
        play_state["PlayMethod"] = play_method
    play_state["RepeatMode"] = "RepeatNone"
    if version.at_least(10, 9):
        play_state["PlaybackOrder"] = "Default"
    media_types = list(playable_media_types or [])
    commands = list(supported_commands or [])
    dto: dict[str, Any] = {
        "PlayState": play_state,
        "AdditionalUsers": [{"UserId": u.id, "UserName": u.name} for u in additional_users],
        "Capabilities": {
            "PlayableMediaTypes": media_types,
            "SupportedCommands": commands,
            "SupportsMediaControl": supports_media_control,
            "SupportsPersistentIdentifier": True,
        },
        "RemoteEndPoint": "127.0.0.1",
        "PlayableMediaTypes": media_types,
        "Id": session_id,
        "UserId": user.id if user is not None else "0" * 32,
    }
    if user is not None:
        dto["UserName"] = user.name
    dto.update(
        {
            "Client": client,
            "LastActivityDate": date_ms(last_activity_ms),
            "LastPlaybackCheckIn": date_ms(last_checkin_ms) if last_checkin_ms else MIN_DATE,
            "DeviceName": device_name,
        }
    )
    if now_playing is not None:
        dto["NowPlayingItem"] = now_playing
    dto.update(
        {
            "DeviceId": device_id,
            "ApplicationVersion": app_version,
            "IsActive": True,
            "SupportsMediaControl": supports_media_control,
            "SupportsRemoteControl": supports_media_control,
            "NowPlayingQueue": [],
            "NowPlayingQueueFullItems": [],
            "HasCustomDeviceName": False,
            "ServerId": server_id,
            "SupportedCommands": commands,
        }
    )
    if not version.at_least(10, 9):
        # 10.8's SessionInfo has no Capabilities DTO of this shape.
        dto.pop("Capabilities")
    return dto


def public_system_info(
    *, local_address: str, server_name: str, version: ServerVersion, server_id: str
) -> dict[str, Any]:
    """Build ``PublicSystemInfo`` (§7)."""
    return {
        "LocalAddress": local_address,
        "ServerName": server_name,
        "Version": version.text,
        "ProductName": PRODUCT_NAME,
        "OperatingSystem": "" if version.at_least(10, 9) else "Linux",
        "Id": server_id,
        "StartupWizardCompleted": True,
    }


def system_info(
    *, local_address: str, server_name: str, version: ServerVersion, server_id: str, port: int
) -> dict[str, Any]:
    """Build ``SystemInfo`` for ``/System/Info``."""
    info = public_system_info(
        local_address=local_address, server_name=server_name, version=version, server_id=server_id
    )
    info.update(
        {
            "OperatingSystemDisplayName": "" if version.at_least(10, 9) else "Linux",
            "PackageName": "jfsync-emulator",
            "HasPendingRestart": False,
            "IsShuttingDown": False,
            "SupportsLibraryMonitor": True,
            "WebSocketPortNumber": port,
            "CompletedInstallations": [],
            "CanSelfRestart": False,
            "CanLaunchWebBrowser": False,
            "ProgramDataPath": "/config/data",
            "WebPath": "/jellyfin/jellyfin-web",
            "ItemsByNamePath": "/config/data/metadata",
            "CachePath": "/cache",
            "LogPath": "/config/log",
            "InternalMetadataPath": "/config/data/metadata",
            "TranscodingTempPath": "/cache/transcodes",
            "HasUpdateAvailable": False,
            "EncoderLocation": "System",
            "SystemArchitecture": "X64",
        }
    )
    if version.at_least(10, 9):
        info["CastReceiverApplications"] = []
    return info


def api_key_dto(key: ApiKey) -> dict[str, Any]:
    """Build an ``AuthenticationInfo`` row of ``GET /Auth/Keys`` (§8.1)."""
    created = date_ms(key.created_ms)
    return {
        "Id": key.id,
        "AccessToken": key.token,
        "DeviceId": "",
        "AppName": key.name,
        "AppVersion": "",
        "DeviceName": "",
        "UserId": "0" * 32,
        "IsActive": True,
        "DateCreated": created,
        "DateLastActivity": created,
    }


def quick_connect_dto(
    *,
    secret: str,
    code: str,
    authenticated: bool,
    device_id: str,
    device_name: str,
    app_name: str,
    app_version: str,
    added_ms: int,
) -> dict[str, Any]:
    """Build a ``QuickConnectResult``."""
    return {
        "Authenticated": authenticated,
        "Secret": secret,
        "Code": code,
        "DeviceId": device_id,
        "DeviceName": device_name,
        "AppName": app_name,
        "AppVersion": app_version,
        "DateAdded": date_ms(added_ms),
    }
