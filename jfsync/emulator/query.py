"""``GET /Items``: filtering, sorting and paging the emulated library (fact sheet §5).

A query's full ordered result (a list of ids) is cached, keyed on the query, the library's
version and, when the query reads user data, that user's data version. Paging through a large
library therefore costs O(library) once and O(page) per page after that. Filters on user data
(IsFavorite, IsResumable, Likes...) start from the user's sparse stored rows instead of the whole
library.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jfsync.emulator.library import Library, LibraryItem
from jfsync.emulator.state import StoredUserData, UserDataStore

#: ``ItemFilter`` values.
ITEM_FILTERS = frozenset(
    {
        "isfolder",
        "isnotfolder",
        "isunplayed",
        "isplayed",
        "isfavorite",
        "isresumable",
        "likes",
        "dislikes",
        "isfavoriteorlikes",
    }
)
#: Filters that only items with stored (non-default) user data can pass.
_SPARSE_FILTERS = frozenset({"isfavorite", "isresumable", "likes", "dislikes", "isfavoriteorlikes"})
#: Sort keys that read user data.
_USER_SORTS = frozenset({"dateplayed", "playcount", "isplayed", "isunplayed", "isfavoriteorliked"})
#: How many full query results stay cached.
_CACHE_SIZE = 32


@dataclass(frozen=True, slots=True)
class ItemQuery:
    """The parameters of one ``/Items`` request that decide which items and in what order."""

    user_id: str | None
    parent_id: str | None
    recursive: bool
    include_types: tuple[str, ...]
    exclude_types: tuple[str, ...]
    filters: frozenset[str]
    is_played: bool | None
    is_favorite: bool | None
    ids: tuple[str, ...]
    sort_by: tuple[str, ...]
    sort_order: tuple[str, ...]
    search_term: str | None
    has_provider: tuple[tuple[str, bool], ...]

    @property
    def reads_user_data(self) -> bool:
        """Tell whether the result depends on the user's data."""
        if self.user_id is None:
            return False
        user_filters = self.filters - {"isfolder", "isnotfolder"}
        return bool(
            user_filters
            or self.is_played is not None
            or self.is_favorite is not None
            or _USER_SORTS.intersection(self.sort_by)
        )


class ItemQueryEngine:
    """Runs item queries over a library and a user-data store, with a result cache."""

    def __init__(self, library: Library, store: UserDataStore, seed: str) -> None:
        self._library = library
        self._store = store
        self._seed = seed
        self._cache: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()

    def run(self, query: ItemQuery) -> list[str]:
        """Return the ids matching ``query`` in result order (cached)."""
        user_version = (
            self._store.version(query.user_id) if query.user_id and query.reads_user_data else 0
        )
        key = (query, self._library.version, user_version)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        result = self._compute(query)
        self._cache[key] = result
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _compute(self, query: ItemQuery) -> list[str]:
        lib = self._library
        candidates = self._candidates(query)
        predicate = self._predicate(query)
        items = [item for item in (lib.get(i) for i in candidates) if item and predicate(item)]
        if query.ids and not query.sort_by:
            return [item.id for item in items]
        self._sort(items, query)
        return [item.id for item in items]

    def _candidates(self, query: ItemQuery) -> list[str]:
        if query.ids:
            return list(dict.fromkeys(query.ids))
        if query.user_id is not None and (
            _SPARSE_FILTERS & query.filters or query.is_favorite is True
        ):
            scope = set(self._scope(query))
            return [i for i in self._store.items_of(query.user_id) if i in scope]
        return self._scope(query)

    def _scope(self, query: ItemQuery) -> list[str]:
        lib = self._library
        if query.parent_id is not None:
            if query.recursive:
                return list(lib.descendants(query.parent_id))
            return lib.children(query.parent_id)
        if query.recursive:
            return lib.item_ids()
        return [f.id for f in lib.collection_folders]

    def _predicate(self, query: ItemQuery) -> Callable[[LibraryItem], bool]:
        include = {t.lower() for t in query.include_types}
        exclude = {t.lower() for t in query.exclude_types}
        filters = query.filters
        user_id = query.user_id
        search = query.search_term.lower() if query.search_term else None
        store = self._store
        lib = self._library

        def played(item: LibraryItem) -> bool:
            assert user_id is not None
            if item.is_folder:
                total = lib.leaf_count(item.id)
                return total > 0 and store.played_below(user_id, item.id) >= total
            row = store.peek(user_id, item.id)
            return row is not None and row.played

        def data(item: LibraryItem) -> StoredUserData:
            assert user_id is not None
            return store.peek(user_id, item.id) or _DEFAULT

        def keep(item: LibraryItem) -> bool:
            if include and item.type.lower() not in include:
                return False
            if exclude and item.type.lower() in exclude:
                return False
            if "isfolder" in filters and not item.is_folder:
                return False
            if "isnotfolder" in filters and item.is_folder:
                return False
            if search is not None and search not in item.name.lower():
                return False
            for provider, wanted in query.has_provider:
                if (provider in item.provider_ids) != wanted:
                    return False
            if user_id is None:
                return True
            if ("isplayed" in filters or query.is_played is True) and not played(item):
                return False
            if ("isunplayed" in filters or query.is_played is False) and played(item):
                return False
            row = data(item)
            if ("isfavorite" in filters or query.is_favorite is True) and not row.is_favorite:
                return False
            if query.is_favorite is False and row.is_favorite:
                return False
            if "isresumable" in filters and row.position_ticks <= 0:
                return False
            if "likes" in filters and row.likes is not True:
                return False
            if "dislikes" in filters and row.likes is not False:
                return False
            # IsFavoriteOrLikes filters on IsFavorite only, on every version (Corrections 4).
            return not ("isfavoriteorlikes" in filters and not row.is_favorite)

        return keep

    def _sort(self, items: list[LibraryItem], query: ItemQuery) -> None:
        sort_by = query.sort_by or ("sortname",)
        orders = query.sort_order or ("ascending",)
        items.sort(key=lambda item: item.id)
        # Stable sorts applied from the least to the most significant key.
        for n in range(len(sort_by) - 1, -1, -1):
            order = orders[n] if n < len(orders) else orders[0]
            items.sort(key=self._sort_key(sort_by[n], query.user_id), reverse=order == "descending")

    def _sort_key(self, name: str, user_id: str | None) -> Callable[[LibraryItem], Any]:
        store = self._store

        def row(item: LibraryItem) -> StoredUserData:
            if user_id is None:
                return _DEFAULT
            return store.peek(user_id, item.id) or _DEFAULT

        keys: dict[str, Callable[[LibraryItem], Any]] = {
            "sortname": lambda i: i.sort_name,
            "name": lambda i: i.name.lower(),
            "seriessortname": lambda i: (i.series_name or "").lower(),
            "datecreated": lambda i: i.created_s,
            "dateplayed": lambda i: _played_at(row(i)),
            "playcount": lambda i: row(i).play_count,
            "isplayed": lambda i: row(i).played,
            "isunplayed": lambda i: not row(i).played,
            "isfavoriteorliked": lambda i: row(i).is_favorite or bool(row(i).likes),
            "premieredate": lambda i: i.year or 0,
            "productionyear": lambda i: i.year or 0,
            "runtime": lambda i: i.run_time_ticks or 0,
            "isfolder": lambda i: i.is_folder,
            "indexnumber": lambda i: i.index_number or 0,
            "parentindexnumber": lambda i: i.parent_index_number or 0,
            "random": lambda i: hashlib.md5(  # noqa: S324 - a shuffle, not security
                (self._seed + i.id).encode()
            ).digest(),
        }
        return keys.get(name, lambda i: 0)


def _played_at(data: StoredUserData) -> float:
    return data.last_played.timestamp() if data.last_played is not None else 0.0


_DEFAULT = StoredUserData()
