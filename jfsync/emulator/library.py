"""The emulated media library: items, their tree, and a deterministic generator.

A library is two collection folders ("Movies" and "Shows"), each standing for one physical
folder (``<root>/movies``, ``<root>/tv``, items of type ``Folder``) that holds the movies (one
directory per movie) and the series with seasons and episodes, laid out on disk the way
Jellyfin users lay them out. As in Jellyfin, a movie's or series' parent is the physical
folder, not the collection folder; queries on a collection folder see its physical folder's
content. Item ids are derived from type and path exactly as Jellyfin derives them
(:func:`jfsync.ids.derive_item_id`), so two emulators generated with the same seed and path root
share ids, and a different root gives different ids for the same titles. Lookups by id, the
parent/child tree and per-folder leaf counts are indexed, so no single-item operation costs
O(library).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from jfsync.ids import LEAF_ITEM_TYPES, derive_item_id

#: Where Jellyfin keeps its virtual library roots (collection folders live in program data).
COLLECTION_ROOT = "/config/data/root/default"

#: Share of generated leaf items that are movies; the rest are episodes.
MOVIE_SHARE = 0.4

#: Items are "created" one second apart from this instant (2024-01-01T00:00:00Z).
BASE_CREATED_S = 1_704_067_200

#: Ticks per minute (1 tick = 100 ns).
_TICKS_PER_MINUTE = 600_000_000

_ADJECTIVES = (
    "Silent",
    "Broken",
    "Golden",
    "Hidden",
    "Last",
    "Crimson",
    "Frozen",
    "Wild",
    "Distant",
    "Burning",
    "Electric",
    "Lonely",
    "Secret",
    "Savage",
    "Gentle",
    "Iron",
    "Midnight",
    "Northern",
    "Pale",
    "Quiet",
    "Restless",
    "Scarlet",
    "Shattered",
    "Sunken",
    "Twisted",
    "Velvet",
    "Wicked",
    "Ancient",
    "Bright",
    "Cold",
    "Dark",
    "Endless",
    "Fallen",
    "Glass",
    "Hollow",
    "Infinite",
    "Lost",
    "Lucky",
    "Paper",
    "Rising",
)
_NOUNS = (
    "River",
    "Empire",
    "Garden",
    "Horizon",
    "Kingdom",
    "Signal",
    "Harbor",
    "Mirror",
    "Orchard",
    "Storm",
    "Voyage",
    "Winter",
    "Summer",
    "Machine",
    "Frontier",
    "Island",
    "Lantern",
    "Meadow",
    "Mountain",
    "Ocean",
    "Palace",
    "Prophecy",
    "Railway",
    "Shadow",
    "Station",
    "Thunder",
    "Valley",
    "Witness",
    "Circle",
    "Compass",
    "Desert",
    "Echo",
    "Forest",
    "Ghost",
    "Heart",
    "Journey",
    "Legacy",
    "Matrix",
    "Night",
    "Planet",
    "Promise",
    "Question",
    "Road",
    "Season",
    "Secret",
    "Spiral",
    "Tide",
    "Tower",
    "Union",
    "Vision",
    "Wave",
    "Whisper",
    "Wolf",
    "Zero",
    "Answer",
    "Bridge",
    "City",
    "Dream",
    "Fire",
    "Garden State",
)
_ARTICLES = ("the ", "a ", "an ")


@dataclass(frozen=True, slots=True)
class LibraryItem:
    """One item of the emulated library (movie, series, season, episode or collection folder)."""

    id: str
    type: str
    name: str
    path: str
    provider_ids: dict[str, str] = field(default_factory=dict, compare=False)
    year: int | None = None
    series_id: str | None = None
    season_id: str | None = None
    parent_id: str | None = None
    index_number: int | None = None
    parent_index_number: int | None = None
    run_time_ticks: int | None = None
    sort_name: str = ""
    series_name: str | None = None
    season_name: str | None = None
    created_s: int = BASE_CREATED_S
    collection_type: str | None = None
    user_data_key: str = ""

    @property
    def is_folder(self) -> bool:
        """Tell whether the item is a folder (series, season, collection folder)."""
        return self.type not in LEAF_ITEM_TYPES

    @property
    def played_from_leaves(self) -> bool:
        """Tell whether the item's played state comes from its leaves (``Folder``
        ``SupportsUserDataFromChildren``): series, seasons and plain folders, not the
        collection folders (library roots), which Jellyfin skips as "far too slow"."""
        return self.is_folder and self.type not in ("CollectionFolder", "UserRootFolder")

    @property
    def is_leaf(self) -> bool:
        """Tell whether the item is a playable leaf (movie, episode)."""
        return self.type in LEAF_ITEM_TYPES


class LibraryError(ValueError):
    """A library change that cannot be made (unknown parent, duplicate path...)."""


class Library:
    """The item tree with id, child and leaf-count indexes."""

    def __init__(self, path_root: str = "/media", *, provider_ids: bool = True) -> None:
        self.path_root = path_root.rstrip("/") or "/media"
        self.with_provider_ids = provider_ids
        self.version = 0
        self._items: dict[str, LibraryItem] = {}
        self._children: dict[str, dict[str, None]] = {}
        self._leaf_counts: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        self._by_key: dict[str, dict[str, None]] = {}
        self._order: dict[str, None] = {}
        self._next_created_s = BASE_CREATED_S
        self.user_root = self._add(
            _folder("UserRootFolder", "Media Folders", COLLECTION_ROOT, None)
        )
        self.movies_folder = self._add(
            _folder("CollectionFolder", "Movies", f"{COLLECTION_ROOT}/Movies", "movies")
        )
        self.shows_folder = self._add(
            _folder("CollectionFolder", "Shows", f"{COLLECTION_ROOT}/Shows", "tvshows")
        )
        self.movies_root = self._add(_folder("Folder", "movies", f"{self.path_root}/movies", None))
        self.shows_root = self._add(_folder("Folder", "tv", f"{self.path_root}/tv", None))
        #: Collection folder id -> the physical folder it stands for (``PhysicalFolderIds``).
        self._physical = {
            self.movies_folder.id: self.movies_root.id,
            self.shows_folder.id: self.shows_root.id,
        }

    # --- reading -------------------------------------------------------------------------

    def get(self, item_id: str) -> LibraryItem | None:
        """Return the item with this id, or None."""
        return self._items.get(item_id)

    def __len__(self) -> int:
        """Count the items below the collection folders."""
        return len(self._order)

    @property
    def collection_folders(self) -> list[LibraryItem]:
        """Return the library roots (the user's views)."""
        return [self.movies_folder, self.shows_folder]

    def items(self) -> list[LibraryItem]:
        """Return every item below the collection folders, in creation order."""
        return [self._items[i] for i in self._order]

    def item_ids(self) -> list[str]:
        """Return the ids of every item below the collection folders, in creation order."""
        return list(self._order)

    def leaf_items(self) -> list[LibraryItem]:
        """Return the playable items (movies and episodes)."""
        return [item for item in self.items() if item.is_leaf]

    @property
    def physical_folders(self) -> list[LibraryItem]:
        """Return the physical root folders (``Folder`` items the collection folders stand for)."""
        return [self.movies_root, self.shows_root]

    def physical(self, item_id: str) -> str:
        """Return the physical folder a collection folder stands for (other ids unchanged)."""
        return self._physical.get(item_id, item_id)

    def children(self, item_id: str) -> list[str]:
        """Return the ids of the direct children of a folder (a collection folder's are its
        physical folder's)."""
        if item_id == self.user_root.id:
            return [f.id for f in self.collection_folders]
        return list(self._children.get(self.physical(item_id), ()))

    def descendants(self, item_id: str) -> Iterator[str]:
        """Yield the ids of every item below a folder, depth first (below the user's root
        folder: every library's content)."""
        if item_id == self.user_root.id:
            for folder in self.collection_folders:
                yield from self.descendants(folder.id)
            return
        stack = list(reversed(self._children.get(self.physical(item_id), {})))
        while stack:
            child = stack.pop()
            yield child
            stack.extend(reversed(self._children.get(child, {})))

    def ancestors(self, item_id: str) -> list[str]:
        """Return the ids of the folders above an item, nearest first."""
        out: list[str] = []
        item = self._items.get(item_id)
        while item is not None and item.parent_id is not None:
            out.append(item.parent_id)
            item = self._items.get(item.parent_id)
        return out

    def same_key(self, item_id: str) -> list[str]:
        """Return the other leaves with this leaf's user-data key (versions of one film)."""
        item = self._items.get(item_id)
        if item is None or not item.is_leaf:
            return []
        return [i for i in self._by_key.get(item.user_data_key, {}) if i != item_id]

    def leaf_count(self, folder_id: str) -> int:
        """Return how many playable items lie (recursively) below a folder."""
        return self._leaf_counts.get(self.physical(folder_id), 0)

    # --- generation ----------------------------------------------------------------------

    def generate(self, leaf_count: int, seed: int) -> None:
        """Fill the library with ``leaf_count`` movies and episodes, deterministic from ``seed``."""
        rng = random.Random(seed)
        # Provider ids are offset by the seed so different seeds rarely share them.
        base = 10_000 + (seed * 7_919) % 900_000
        movie_total = round(leaf_count * MOVIE_SHARE) if leaf_count > 1 else leaf_count
        episode_total = leaf_count - movie_total
        used_titles: set[str] = set()
        for n in range(movie_total):
            title, year = _unique_title(rng, used_titles)
            ids = {"Tmdb": str(base + n), "Imdb": f"tt{1_000_000 + base + n:07d}"}
            self._add_movie(title, year, ids, rng.randint(80, 180) * _TICKS_PER_MINUTE)
        made = 0
        series_n = 0
        while made < episode_total:
            title, year = _unique_title(rng, used_titles)
            series_n += 1
            ids = {
                "Tvdb": str(base + series_n),
                "Imdb": f"tt{5_000_000 + base + series_n:07d}",
                "Tmdb": str(500_000 + base + series_n),
            }
            series = self._add_series(title, year, ids)
            for season_no in range(1, rng.randint(1, 4) + 1):
                if made >= episode_total:
                    break
                season = self._add_season(series, season_no)
                for episode_no in range(1, rng.randint(4, 12) + 1):
                    if made >= episode_total:
                        break
                    tvdb = str(2_000_000 + base * 10 + made)
                    minutes = rng.choice((22, 24, 30, 42, 45, 55, 60))
                    self._add_episode(
                        season, episode_no, {"Tvdb": tvdb}, minutes * _TICKS_PER_MINUTE
                    )
                    made += 1

    # --- changes -------------------------------------------------------------------------

    def add_item(
        self,
        item_type: str,
        name: str,
        *,
        year: int | None = None,
        parent_id: str | None = None,
        path: str | None = None,
        provider_ids: dict[str, str] | None = None,
        index_number: int | None = None,
        run_time_ticks: int | None = None,
    ) -> LibraryItem:
        """Add one Movie, Series, Season or Episode and return it.

        Movies and series go under their collection folder; a season needs its series as
        ``parent_id`` and an episode its season. Paths default to the generator's layout.
        """
        ids = dict(provider_ids or {})
        if item_type == "Movie":
            return self._add_movie(name, year, ids, run_time_ticks or 100 * _TICKS_PER_MINUTE, path)
        if item_type == "Series":
            return self._add_series(name, year, ids, path)
        parent = self._items.get(parent_id or "")
        if item_type == "Season":
            if parent is None or parent.type != "Series":
                raise LibraryError("a Season needs its Series as parent_id")
            number = index_number if index_number is not None else len(self.children(parent.id)) + 1
            return self._add_season(parent, number, path)
        if item_type == "Episode":
            if parent is None or parent.type != "Season":
                raise LibraryError("an Episode needs its Season as parent_id")
            number = index_number if index_number is not None else len(self.children(parent.id)) + 1
            ticks = run_time_ticks or 45 * _TICKS_PER_MINUTE
            return self._add_episode(parent, number, ids, ticks, path, name)
        raise LibraryError(f"cannot add items of type {item_type!r}")

    def remove_item(self, item_id: str) -> list[LibraryItem]:
        """Remove an item and everything below it; return the removed items, top first."""
        item = self._items.get(item_id)
        if item is None or item.parent_id is None:
            raise LibraryError(f"no removable item {item_id}")
        removed = [item] + [self._items[i] for i in self.descendants(item_id)]
        for gone in reversed(removed):
            self._unlink(gone)
        self.version += 1
        return removed

    def replace_items(self, items: list[LibraryItem]) -> None:
        """Replace everything below the physical folders with ``items`` (parents first), as
        a saved state has them."""
        for item in reversed(self.items()):
            self._unlink(item)
        for item in items:
            self._add(item)
        self._next_created_s = max([BASE_CREATED_S, *(i.created_s for i in items)])

    def move_item(self, item_id: str, new_path: str) -> LibraryItem:
        """Move a movie or episode file to ``new_path``; Jellyfin then sees a new item id.

        The id derives from the path, so a moved file is removed and re-added under a new id
        (same parent, same metadata).
        """
        item = self._items.get(item_id)
        if item is None or not item.is_leaf:
            raise LibraryError(f"no movable leaf item {item_id}")
        if new_path in self._paths:
            raise LibraryError(f"path already in the library: {new_path}")
        self._unlink(item)
        new_id = derive_item_id(item.type, new_path)
        key = _dashed(new_id) if item.user_data_key == _dashed(item.id) else item.user_data_key
        moved = replace(item, id=new_id, path=new_path, user_data_key=key)
        self._add(moved)
        return moved

    # --- internals -----------------------------------------------------------------------

    def _add_movie(
        self,
        title: str,
        year: int | None,
        ids: dict[str, str],
        ticks: int,
        path: str | None = None,
    ) -> LibraryItem:
        label = f"{title} ({year})" if year else title
        path = path or f"{self.path_root}/movies/{label}/{label}.mkv"
        ids = ids if self.with_provider_ids else {}
        item_id = derive_item_id("Movie", path)
        key = ids.get("Tmdb") or ids.get("Imdb") or _dashed(item_id)
        return self._add(
            LibraryItem(
                id=item_id,
                type="Movie",
                name=title,
                path=path,
                provider_ids=ids,
                year=year,
                parent_id=self.movies_root.id,
                run_time_ticks=ticks,
                sort_name=_sort_name(title),
                created_s=self._created(),
                user_data_key=key,
            )
        )

    def _add_series(
        self, title: str, year: int | None, ids: dict[str, str], path: str | None = None
    ) -> LibraryItem:
        label = f"{title} ({year})" if year else title
        path = path or f"{self.path_root}/tv/{label}"
        ids = ids if self.with_provider_ids else {}
        item_id = derive_item_id("Series", path)
        key = ids.get("Tvdb") or ids.get("Imdb") or _dashed(item_id)
        return self._add(
            LibraryItem(
                id=item_id,
                type="Series",
                name=title,
                path=path,
                provider_ids=ids,
                year=year,
                parent_id=self.shows_root.id,
                sort_name=_sort_name(title),
                created_s=self._created(),
                user_data_key=key,
            )
        )

    def _add_season(self, series: LibraryItem, number: int, path: str | None = None) -> LibraryItem:
        path = path or f"{series.path}/Season {number:02d}"
        item_id = derive_item_id("Season", path)
        series_key = series.user_data_key
        key = f"{series_key}{number:03d}" if series.provider_ids else _dashed(item_id)
        name = f"Season {number}"
        return self._add(
            LibraryItem(
                id=item_id,
                type="Season",
                name=name,
                path=path,
                provider_ids={},
                year=series.year,
                series_id=series.id,
                parent_id=series.id,
                index_number=number,
                sort_name=f"{number:04d}",
                series_name=series.name,
                created_s=self._created(),
                user_data_key=key,
            )
        )

    def _add_episode(
        self,
        season: LibraryItem,
        number: int,
        ids: dict[str, str],
        ticks: int,
        path: str | None = None,
        name: str | None = None,
    ) -> LibraryItem:
        series = self._items[season.series_id or ""]
        season_no = season.index_number or 0
        label = f"{series.name} S{season_no:02d}E{number:02d}"
        path = path or f"{season.path}/{label}.mkv"
        ids = ids if self.with_provider_ids else {}
        item_id = derive_item_id("Episode", path)
        # Jellyfin keys an episode's user data by its series' key plus SSSEEE.
        if series.provider_ids:
            key = f"{series.user_data_key}{season_no:03d}{number:03d}"
        else:
            key = ids.get("Tvdb") or _dashed(item_id)
        title = name or f"Episode {number}"
        return self._add(
            LibraryItem(
                id=item_id,
                type="Episode",
                name=title,
                path=path,
                provider_ids=ids,
                year=series.year,
                series_id=series.id,
                season_id=season.id,
                parent_id=season.id,
                index_number=number,
                parent_index_number=season_no,
                run_time_ticks=ticks,
                sort_name=f"{season_no:03d} - {number:04d} - {title.lower()}",
                series_name=series.name,
                season_name=season.name,
                created_s=self._created(),
                user_data_key=key,
            )
        )

    def _add(self, item: LibraryItem) -> LibraryItem:
        if item.id in self._items or item.path in self._paths:
            raise LibraryError(f"an item with this path already exists: {item.path}")
        if item.parent_id is not None and item.parent_id not in self._items:
            raise LibraryError(f"unknown parent {item.parent_id}")
        self._items[item.id] = item
        self._paths[item.path] = item.id
        if item.is_folder:
            self._children.setdefault(item.id, {})
        if item.parent_id is not None:
            self._children.setdefault(item.parent_id, {})[item.id] = None
            self._order[item.id] = None
        if item.is_leaf:
            for folder in self.ancestors(item.id):
                self._leaf_counts[folder] = self._leaf_counts.get(folder, 0) + 1
            self._by_key.setdefault(item.user_data_key, {})[item.id] = None
        self.version += 1
        return item

    def _unlink(self, item: LibraryItem) -> None:
        if item.is_leaf:
            for folder in self.ancestors(item.id):
                self._leaf_counts[folder] -= 1
            sharing = self._by_key.get(item.user_data_key, {})
            sharing.pop(item.id, None)
            if not sharing:
                self._by_key.pop(item.user_data_key, None)
        if item.parent_id is not None:
            self._children.get(item.parent_id, {}).pop(item.id, None)
        self._children.pop(item.id, None)
        self._leaf_counts.pop(item.id, None)
        self._order.pop(item.id, None)
        self._paths.pop(item.path, None)
        del self._items[item.id]
        self.version += 1

    def _created(self) -> int:
        self._next_created_s += 1
        return self._next_created_s


def _folder(kind: str, name: str, path: str, collection_type: str | None) -> LibraryItem:
    item_id = derive_item_id(kind, path)
    return LibraryItem(
        id=item_id,
        type=kind,
        name=name,
        path=path,
        sort_name=name.lower(),
        collection_type=collection_type,
        user_data_key=_dashed(item_id),
    )


def _unique_title(rng: random.Random, used: set[str]) -> tuple[str, int]:
    while True:
        title = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rng.random() < 0.3:
            title = "The " + title
        year = rng.randint(1950, 2025)
        label = f"{title} ({year})".lower()
        if label not in used:
            used.add(label)
            return title, year
        # Collisions grow with size; a numbered sequel keeps the generator O(n).
        for sequel in range(2, 1000):
            numbered = f"{title} {sequel}"
            if f"{numbered} ({year})".lower() not in used:
                used.add(f"{numbered} ({year})".lower())
                return numbered, year


def _sort_name(name: str) -> str:
    lowered = name.lower()
    for article in _ARTICLES:
        if lowered.startswith(article):
            return lowered[len(article) :]
    return lowered


def _dashed(item_id: str) -> str:
    # Jellyfin keys user data of items without provider ids by the dashed Guid form.
    return str(uuid.UUID(hex=item_id))
