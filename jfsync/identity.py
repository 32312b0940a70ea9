"""Identity: which canonical item a server's item is, and which server item a canonical one is.

The replication core asks one question through :class:`ItemIdentity`: the canonical keys of a
batch of a server's item ids. :class:`IdenticalIds` is the first strategy: servers that share
item ids (same type and path, the same library layout) use the id itself as the canonical key.
Matching by rewritten path and by provider ids plugs in behind the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class ItemIdentity(Protocol):
    """Resolve a server's item ids to canonical item keys."""

    async def canonical_items(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Return remote id -> canonical key for the ids that map (others are left out)."""
        ...


class IdenticalIds:
    """Items are the same when their ids are the same (type and path identical)."""

    async def canonical_items(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Map every id to itself."""
        return {remote_id: remote_id for remote_id in remote_ids}
