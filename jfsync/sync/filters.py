"""Library filters: which of a server's libraries jfsync reads and writes (``servers[].libraries``).

:func:`resolve_scope` asks the server for its libraries (``/Library/VirtualFolders``) and turns
the config's ``include``/``exclude`` names into a :class:`LibraryScope`: the ids of the libraries
synced (what scans pass as ``parentId``) and the folders on disk of each, so an item read by id
(a ``LibraryChanged`` refresh) can be placed by its path. The library index stores only items of
synced libraries, so everything else follows from it: an event on an item it does not map is
ignored, a catch-up never observes it, and no row is ever queued for it. A name in the config
that the server has no library of is reported (a typo would otherwise silently sync nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from jfsync.config import LibraryFilter
from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import VirtualFolderInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Library:
    """One library of a server: its name, collection folder id and folders on disk."""

    name: str
    item_id: str
    locations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LibraryScope:
    """What a server's library filter leaves in, resolved against its libraries."""

    server: str
    included: tuple[Library, ...]
    excluded: tuple[Library, ...]
    #: Names in the filter that the server has no library of.
    unknown: tuple[str, ...] = ()

    @property
    def parent_ids(self) -> list[str]:
        """The collection folder ids to scan (``parentId``), one listing each."""
        return [lib.item_id for lib in self.included]

    def allows_path(self, path: str | None) -> bool:
        """Tell whether an item at ``path`` lies in a synced library.

        An item below a folder of an excluded library is out; one below a folder of a synced
        library is in; one without a path, or under no known folder, is out (only a scan of
        its library, by ``parentId``, can place it).
        """
        if not path:
            return False
        best: tuple[int, bool] | None = None
        for libs, allowed in ((self.included, True), (self.excluded, False)):
            for lib in libs:
                for folder in lib.locations:
                    if _under(path, folder) and (best is None or len(folder) > best[0]):
                        best = (len(folder), allowed)
        return best is not None and best[1]

    def describe(self) -> str:
        """One line for logs and reports: what is synced and what is left out."""
        text = (
            f"syncing {', '.join(lib.name for lib in self.included) or 'no library'}; "
            f"excluded: {', '.join(lib.name for lib in self.excluded) or 'none'}"
        )
        if self.unknown:
            text += f"; not found on the server: {', '.join(self.unknown)}"
        return text


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/\\")
    return path == folder or path.startswith((folder + "/", folder + "\\"))


def scope_of(
    server: str, rule: LibraryFilter, libraries: Sequence[VirtualFolderInfo]
) -> LibraryScope:
    """Resolve ``rule`` against the server's ``libraries`` (pure)."""
    included: list[Library] = []
    excluded: list[Library] = []
    present = {lib.name.casefold() for lib in libraries}
    for info in libraries:
        if info.item_id is None:
            continue
        lib = Library(info.name, info.item_id, tuple(info.locations))
        (included if rule.allows(info.name) else excluded).append(lib)
    named = rule.include if rule.include is not None else rule.exclude or []
    unknown = tuple(n for n in named if n.casefold() not in present)
    return LibraryScope(server, tuple(included), tuple(excluded), unknown)


async def resolve_scope(
    client: JellyfinClient, server: str, rule: LibraryFilter | None
) -> LibraryScope | None:
    """Read the server's libraries and resolve its filter (None: no filter, everything syncs)."""
    if rule is None:
        return None
    scope = scope_of(server, rule, await client.libraries())
    if scope.unknown:
        logger.warning(
            "[%s] servers[].libraries names libraries this server does not have: %s "
            "(it has %s); check the spelling",
            server,
            ", ".join(scope.unknown),
            ", ".join(lib.name for lib in (*scope.included, *scope.excluded)) or "none",
        )
    return scope
