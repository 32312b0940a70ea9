"""Browsing routes third-party clients use: TV shows, next up and resume lists (Corrections 8).

``GET /Shows/{seriesId}/Episodes`` and ``/Seasons`` follow ``TvShowsController`` (the series,
or with ``seasonId`` the season, must exist: 404 otherwise; an unknown season *number* is an
empty answer), ``GET /Shows/NextUp`` follows ``TVSeriesManager`` in a simplified form (the
first unplayed episode after the last played one, series ordered by when they were last
watched), and the resume lists (``/UserItems/Resume`` from 10.9, legacy
``/Users/{userId}/Items/Resume``) list the user's items with a resume position, most recently
played first. Every answer is a ``QueryResult`` of item DTOs with user data, built by
:class:`jfsync.emulator.app.JellyfinApi`.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from jfsync.emulator.http import Ctx, HttpError, ItemViews, json_response, parse_guid
from jfsync.emulator.library import LibraryItem
from jfsync.emulator.query import ItemQuery
from jfsync.emulator.state import EmuUser


class BrowseApi:
    """The TV and resume handlers of one emulated server."""

    def __init__(self, api: ItemViews) -> None:
        self.api = api
        self.emu = api.emu

    # --- helpers -------------------------------------------------------------------------

    def _series(self, item_text: str) -> LibraryItem | None:
        item = self.emu.library.get(parse_guid(item_text))
        return item if item is not None and item.type == "Series" else None

    def _episodes_of(self, folder_id: str) -> list[LibraryItem]:
        """Episodes below a series or season in aired order (season, then episode number)."""
        lib = self.emu.library
        found = [lib.get(i) for i in lib.descendants(folder_id)]
        episodes = [i for i in found if i is not None and i.type == "Episode"]
        episodes.sort(key=lambda e: (e.parent_index_number or 0, e.index_number or 0, e.id))
        return episodes

    def _page(
        self, ctx: Ctx, items: list[LibraryItem], user: EmuUser | None, total: int | None = None
    ) -> web.Response:
        start, limit = self.api.paging(ctx)
        page = items[start : start + limit if limit is not None else None]
        dtos = self.api.item_dtos(ctx, page, user)
        count = len(items) if total is None else total
        return json_response({"Items": dtos, "TotalRecordCount": count, "StartIndex": start})

    # --- /Shows --------------------------------------------------------------------------

    async def episodes(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Shows/{seriesId}/Episodes``: by season id, season number or the whole series."""
        user = self.api.optional_user(ctx)
        season_id = ctx.guid("seasonId")
        season_no = self.api.number(ctx, "season")
        if season_id is not None:
            season = self.emu.library.get(season_id)
            if season is None or season.type != "Season":
                raise HttpError(404, f"No season exists with Id {season_id}")
            episodes = self._episodes_of(season.id)
        else:
            series = self._series(ctx.params["seriesId"])
            if series is None:
                raise HttpError(404, "Series not found")
            if season_no is not None:
                seasons = [
                    s
                    for s in (self.emu.library.get(i) for i in self.emu.library.children(series.id))
                    if s is not None and s.type == "Season" and s.index_number == season_no
                ]
                episodes = self._episodes_of(seasons[0].id) if seasons else []
            else:
                episodes = self._episodes_of(series.id)
        # Every emulated episode has its file: none is "missing".
        if ctx.boolean("isMissing") is True:
            episodes = []
        if (ctx.first("sortBy") or "").lower() == "random":
            seed = self.emu.server_id
            episodes.sort(key=lambda e: hashlib.md5((seed + e.id).encode()).digest())  # noqa: S324
        total = len(episodes)
        start_item = ctx.guid("startItemId")
        if start_item is not None:
            ids = [e.id for e in episodes]
            episodes = episodes[ids.index(start_item) :] if start_item in ids else []
        return self._page(ctx, episodes, user, total)

    async def seasons(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Shows/{seriesId}/Seasons``: the series' seasons in order, all at once."""
        user = self.api.optional_user(ctx)
        series = self._series(ctx.params["seriesId"])
        if series is None:
            raise HttpError(404, "Series not found")
        lib = self.emu.library
        seasons = [s for s in (lib.get(i) for i in lib.children(series.id)) if s is not None]
        seasons.sort(key=lambda s: (s.index_number or 0, s.id))
        if ctx.boolean("isSpecialSeason") is True:
            seasons = [s for s in seasons if s.index_number == 0]
        elif ctx.boolean("isSpecialSeason") is False:
            seasons = [s for s in seasons if s.index_number != 0]
        if ctx.boolean("isMissing") is True:
            seasons = []
        dtos = self.api.item_dtos(ctx, seasons, user)
        return json_response({"Items": dtos, "TotalRecordCount": len(dtos), "StartIndex": 0})

    async def next_up(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Shows/NextUp``: per series, the first unplayed episode after the last played."""
        user = self.api.required_user(ctx)
        store = self.emu.store
        lib = self.emu.library
        only_series = ctx.guid("seriesId")
        parent = ctx.guid("parentId")
        disable_first = bool(ctx.boolean("disableFirstEpisode", False))
        resumable = bool(ctx.boolean("enableResumable", True))
        rewatching = bool(ctx.boolean("enableRewatching", False))
        cutoff = ctx.first("nextUpDateCutoff")
        cutoff_s = self.api.date_param(cutoff).timestamp() if cutoff else None
        last_watched: dict[str, float] = {}
        for item_id in store.items_of(user.id):
            row = store.peek(user.id, item_id)
            item = lib.get(item_id)
            if row is None or item is None or item.type != "Episode" or not row.played:
                continue
            when = row.last_played.timestamp() if row.last_played is not None else 0.0
            series_id = item.series_id or ""
            last_watched[series_id] = max(last_watched.get(series_id, 0.0), when)
        if only_series is not None:
            candidates = {only_series: last_watched.get(only_series, 0.0)}
        else:
            candidates = dict(last_watched)
        if parent is not None:
            below = set(lib.descendants(parent)) | {parent}
            candidates = {s: t for s, t in candidates.items() if s in below}
        results: list[tuple[float, LibraryItem]] = []
        for series_id, when in candidates.items():
            if cutoff_s is not None and series_id in last_watched and when < cutoff_s:
                continue
            episodes = self._episodes_of(series_id)
            if not episodes:
                continue
            played = [self._played(user, e) for e in episodes]
            if any(played):
                last = max(n for n, p in enumerate(played) if p)
                rest = [e for e, p in zip(episodes[last + 1 :], played[last + 1 :], strict=True)]
                following = [e for e in rest if rewatching or not self._played(user, e)]
            elif disable_first:
                continue
            else:
                following = episodes
            if not resumable:
                following = [e for e in following if not self._in_progress(user, e)]
            if following:
                results.append((when, following[0]))
        results.sort(key=lambda pair: (-pair[0], pair[1].series_name or "", pair[1].id))
        return self._page(ctx, [item for _, item in results], user)

    def _played(self, user: EmuUser, item: LibraryItem) -> bool:
        row = self.emu.store.peek(user.id, item.id)
        return row is not None and row.played

    def _in_progress(self, user: EmuUser, item: LibraryItem) -> bool:
        row = self.emu.store.peek(user.id, item.id)
        return row is not None and row.position_ticks > 0

    # --- resume --------------------------------------------------------------------------

    async def resume(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /UserItems/Resume`` (+ legacy): items with a position, last played first."""
        user = self.api.required_user(ctx)
        kinds = self.api.kinds(ctx)
        query = ItemQuery(
            user_id=user.id,
            parent_id=ctx.guid("parentId"),
            recursive=True,
            include_types=kinds[0],
            exclude_types=kinds[1],
            filters=frozenset({"isresumable"}),
            is_played=None,
            is_favorite=None,
            ids=(),
            sort_by=("dateplayed",),
            sort_order=("descending",),
            search_term=ctx.first("searchTerm") or None,
            has_provider=(),
        )
        lib = self.emu.library
        media_types = {m.lower() for m in ctx.array("mediaTypes")}
        items = [i for i in (lib.get(x) for x in self.api.queries.run(query)) if i is not None]
        if media_types and "video" not in media_types:
            items = []
        return self._page(ctx, items, user)

    # --- fixed-name routes (never read as ids) -------------------------------------------

    async def latest(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/Latest`` (10.9+) and ``/Users/{userId}/Items/Latest``: recently added
        movies and episodes, newest first, an array (not a QueryResult); with ``groupItems``
        (the default) several new episodes of one series show as that series."""
        user = self.api.required_user(ctx)
        lib = self.emu.library
        parent = ctx.guid("parentId")
        scope = lib.descendants(parent) if parent is not None else iter(lib.item_ids())
        include = set(self.api.kinds(ctx)[0])
        played = ctx.boolean("isPlayed")
        leaves = [i for i in (lib.get(x) for x in scope) if i is not None and i.is_leaf]
        if include:
            leaves = [i for i in leaves if i.type in include]
        if played is not None:
            leaves = [i for i in leaves if self._played(user, i) == played]
        leaves.sort(key=lambda i: (-i.created_s, i.id))
        limit = self.api.number(ctx, "limit")
        limit = 20 if limit is None else limit
        out: list[LibraryItem] = []
        if ctx.boolean("groupItems", True):
            per_series: dict[str, int] = {}
            for leaf in leaves:
                if leaf.series_id:
                    per_series[leaf.series_id] = per_series.get(leaf.series_id, 0) + 1
            seen: set[str] = set()
            for leaf in leaves:
                series = leaf.series_id
                if series and per_series[series] > 1:
                    if series in seen:
                        continue
                    seen.add(series)
                    found = lib.get(series)
                    if found is not None:
                        out.append(found)
                    continue
                out.append(leaf)
        else:
            out = leaves
        return json_response(self.api.item_dtos(ctx, out[:limit], user))

    async def suggestions(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/Suggestions``: unplayed movies and episodes in a stable shuffle."""
        user = self.api.optional_user(ctx)
        lib = self.emu.library
        kinds = {k.lower() for k in ctx.array("type")} or {"movie", "episode"}
        items = [i for i in lib.leaf_items() if i.type.lower() in kinds]
        if user is not None:
            items = [i for i in items if not self._played(user, i)]
        seed = self.emu.server_id
        items.sort(key=lambda i: hashlib.md5((seed + i.id).encode()).digest())  # noqa: S324
        return self._page(ctx, items, user)

    async def root(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/Root``: the user's root folder."""
        user = self.api.required_user(ctx)
        return json_response(self.api.plain_item_dto(self.emu.library.user_root, user))

    async def counts(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/Counts``: how many movies, series and episodes (favourites only with
        ``isFavorite=true``)."""
        user = self.api.optional_user(ctx)
        favorite = ctx.boolean("isFavorite")
        tally = {"Movie": 0, "Series": 0, "Episode": 0}
        for item in self.emu.library.items():
            if item.type not in tally:
                continue
            if favorite is not None and user is not None:
                row = self.emu.store.peek(user.id, item.id)
                if (row is not None and row.is_favorite) != favorite:
                    continue
            tally[item.type] += 1
        body = {
            "MovieCount": tally["Movie"],
            "SeriesCount": tally["Series"],
            "EpisodeCount": tally["Episode"],
            "ArtistCount": 0,
            "ProgramCount": 0,
            "TrailerCount": 0,
            "SongCount": 0,
            "AlbumCount": 0,
            "MusicVideoCount": 0,
            "BoxSetCount": 0,
            "BookCount": 0,
            "ItemCount": sum(tally.values()),
        }
        return json_response(body)

    async def filters(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/Filters``: the years present (no genres, tags or ratings here)."""
        self.api.optional_user(ctx)
        lib = self.emu.library
        parent = ctx.guid("parentId")
        scope = lib.descendants(parent) if parent is not None else iter(lib.item_ids())
        include = set(self.api.kinds(ctx)[0])
        years = {
            item.year
            for item in (lib.get(i) for i in scope)
            if item is not None and item.year is not None and (not include or item.type in include)
        }
        body = {"Genres": [], "Tags": [], "OfficialRatings": [], "Years": sorted(years)}
        return json_response(body)

    async def media_folders(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Library/MediaFolders``: the collection folders (admin)."""
        folders = self.emu.library.collection_folders
        if ctx.boolean("isHidden") is True:
            folders = []
        dtos = [self.api.plain_item_dto(f, None) for f in folders]
        return json_response({"Items": dtos, "TotalRecordCount": len(dtos), "StartIndex": 0})

    async def virtual_folders(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Library/VirtualFolders``: the libraries with their folders on disk (admin).

        A plain JSON array of ``VirtualFolderInfo``; ``ItemId`` is the collection folder's id
        (what ``parentId`` takes), ``Locations`` the paths its items live under.
        """
        lib = self.emu.library
        out = []
        for folder in lib.collection_folders:
            physical = lib.get(lib.physical(folder.id))
            out.append(
                {
                    "Name": folder.name,
                    "Locations": [physical.path] if physical is not None and physical.path else [],
                    "CollectionType": folder.collection_type,
                    "ItemId": folder.id,
                    "PrimaryImageItemId": folder.id,
                    "RefreshStatus": "Idle",
                }
            )
        return json_response(out)

    async def ancestors(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/{itemId}/Ancestors``: parents nearest first; for a user the physical
        folder shows as the collection folder it belongs to (``TranslateParentItem``)."""
        item_id = parse_guid(ctx.params["itemId"])
        user = self.api.optional_user(ctx)
        lib = self.emu.library
        if lib.get(item_id) is None:
            raise HttpError(404, "Item not found")
        views = {lib.physical(f.id): f for f in lib.collection_folders}
        out: list[LibraryItem] = []
        for parent_id in lib.ancestors(item_id):
            parent = lib.get(parent_id)
            if parent is None:
                continue
            out.append(views.get(parent.id, parent) if user is not None else parent)
        return json_response([self.api.plain_item_dto(p, user) for p in out])

    async def similar(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Items/{itemId}/Similar``: items of the same kind, nearest year first."""
        item_id = parse_guid(ctx.params["itemId"])
        user = self.api.optional_user(ctx)
        item = self.emu.library.get(item_id)
        if item is None:
            raise HttpError(404, "Item not found")
        kind = "Series" if item.type in ("Season", "Episode") else item.type
        others = [i for i in self.emu.library.items() if i.type == kind and i.id != item.id]
        year = item.year or 0
        others.sort(key=lambda i: (abs((i.year or 0) - year), i.sort_name, i.id))
        limit = self.api.number(ctx, "limit")
        page = others[:limit] if limit is not None else others
        dtos = self.api.item_dtos(ctx, page, user)
        return json_response({"Items": dtos, "TotalRecordCount": len(dtos), "StartIndex": 0})

    async def artists(self, ctx: Ctx) -> web.StreamResponse:
        """``GET /Artists``: a video library has no artists."""
        self.api.optional_user(ctx)
        start, _ = self.api.paging(ctx)
        return json_response({"Items": [], "TotalRecordCount": 0, "StartIndex": start})
