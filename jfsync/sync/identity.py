"""Identity: which canonical item a server's item is, and which server item a canonical one is.

The replication core asks through :class:`ItemIdentity`: the canonical keys of a batch of a
server's item ids (and the reverse). Two strategies implement it:

* :class:`IdenticalIds`: servers that share item ids (same type and path, the same library
  layout) use the id itself as the canonical key;
* :class:`IndexedIdentity`, the service's default: every server's leaf items are indexed in the
  ledger (:mod:`jfsync.sync.index`) and matched across servers, in order, by identical id, by path
  after each server's prefix rewrites, and by provider ids with the type (episodes by their
  series' provider ids plus season and episode numbers). A match needs exactly one candidate on
  each side; anything else is *ambiguous*: refused, reported, and left unmapped, so nothing is
  read or written for it. Items on one server only keep a key of their own (their changes stay
  in the ledger and are delivered when the item appears elsewhere). Earlier matches are kept as
  long as the two items still share a match key, and canonical keys persist in the ledger's
  id map, so they are stable across restarts. After the first complete match, a change (a
  ``LibraryChanged`` refresh, a rescan) matches again only the entries linked to what changed
  (candidate pairs under any rule, or one canonical item), before and after the change: an
  entry's match depends on nothing else, so the outcome is the full match's, in milliseconds.

:func:`match_pair` and :func:`build_groups` are the pure matching steps, tested on their own.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from jfsync.config import Config
from jfsync.errors import JfsyncError
from jfsync.heap import KeySet, release_free_memory
from jfsync.heap import drain as _drain
from jfsync.jellyfin.api import JellyfinClient
from jfsync.sync.index import (
    PAGE_SIZE,
    RULES,
    GroupRow,
    LibraryIndex,
    PageHook,
    Rule,
    ScanResult,
)
from jfsync.sync.ledger import ItemMapping, Ledger
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock

logger = logging.getLogger(__name__)

#: Samples of each kind kept per server pair for the status page.
SAMPLE_SIZE = 5
#: Mapping changes written per ledger transaction.
REMAP_CHUNK = 5000
#: Marks an entry with more than one candidate while matching.
_MANY = -1
#: A change linked to more entries than this (or than 5% of the index) is matched again
#: in full.
INCREMENTAL_LIMIT = 5000


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """What a refresh changed: the servers whose id map moved, and how much."""

    servers: frozenset[str] = frozenset()
    mapped: int = 0
    unmapped: int = 0
    retired: int = 0

    def __or__(self, other: IdentityChange) -> IdentityChange:
        return IdentityChange(
            self.servers | other.servers,
            self.mapped + other.mapped,
            self.unmapped + other.unmapped,
            self.retired + other.retired,
        )


class ItemIdentity(Protocol):
    """Resolve a server's item ids to canonical item keys, and keep that resolution fresh."""

    #: True when every item a server has is mapped (items a server lacks are then known).
    complete: bool

    async def start(self, clients: Mapping[str, JellyfinClient]) -> None:
        """Get ready to answer; ``clients`` are the REST clients by server name."""
        ...

    async def close(self) -> None:
        """Stop background work and release resources."""
        ...

    def server_reachable(self, server: str) -> None:
        """Note that ``server`` answers (the first index scan can start)."""
        ...

    async def canonical_items(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Return remote id -> canonical key for the ids that map (others are left out)."""
        ...

    async def remote_items(self, server: str, items: Iterable[str]) -> dict[str, str]:
        """Return canonical key -> the server's item id for the keys the server has."""
        ...

    async def refresh(self, servers: Iterable[str] | None = None) -> IdentityChange:
        """Rescan the servers' libraries (all by default) and match again."""
        ...

    async def siblings(self, server: str, remote_ids: Iterable[str]) -> dict[str, set[str]]:
        """Other items of ``server`` sharing a provider-id key with each of ``remote_ids``
        (versions of one film): up to 10.10 they share one user-data record."""
        ...

    async def library_changed(
        self, server: str, changed: Iterable[str], removed: Iterable[str]
    ) -> IdentityChange:
        """Re-read items added or updated on ``server``, drop removed ones, match again."""
        ...

    def status(self) -> dict[str, Any]:
        """Matching counts per server pair with samples, for the status endpoint."""
        ...


class IdenticalIds:
    """Items are the same when their ids are the same (type and path identical)."""

    complete = False

    def __init__(self, servers: Sequence[str] = ()) -> None:
        self._servers = list(servers)

    async def start(self, clients: Mapping[str, JellyfinClient]) -> None:
        """Nothing to prepare."""
        self._servers = self._servers or list(clients)

    async def close(self) -> None:
        """Nothing to release."""

    def server_reachable(self, server: str) -> None:
        """Nothing to scan."""

    async def canonical_items(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Map every id to itself."""
        return {remote_id: remote_id for remote_id in remote_ids}

    async def remote_items(self, server: str, items: Iterable[str]) -> dict[str, str]:
        """Map every key to itself."""
        return {item: item for item in items}

    async def refresh(self, servers: Iterable[str] | None = None) -> IdentityChange:
        """Nothing to rescan."""
        return IdentityChange()

    async def siblings(self, server: str, remote_ids: Iterable[str]) -> dict[str, set[str]]:
        """No index: no item is known to share another's record."""
        return {}

    async def library_changed(
        self, server: str, changed: Iterable[str], removed: Iterable[str]
    ) -> IdentityChange:
        """Nothing to re-read."""
        return IdentityChange()

    def status(self) -> dict[str, Any]:
        """No counts: every id is taken as shared."""
        names = self._servers
        return {
            "strategy": "identical-ids",
            "pairs": [
                {"servers": [a, b], "matched": None, "unmatched": None, "ambiguous": None}
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            ],
        }


# ---------------------------------------------------------------------- pure matching


@dataclass(slots=True)
class PairResult:
    """How the entries of two servers matched."""

    servers: tuple[str, str]
    #: entry on the first server -> entry on the second.
    matched: dict[int, int] = field(default_factory=dict)
    #: entry on the first server -> the rule that matched it (or still confirms a kept match).
    rule_of: dict[int, str] = field(default_factory=dict)
    #: first-server entries of earlier matches kept.
    kept: set[int] = field(default_factory=set)
    #: entries (of either server) refused because a rule gave them several candidates.
    ambiguous: dict[int, str] = field(default_factory=dict)


class PairMatcher:
    """Match two servers' entries rule by rule, one rule's candidate pairs at a time."""

    def __init__(self, servers: tuple[str, str], kept: Mapping[int, int]) -> None:
        self.result = PairResult(servers)
        self._kept = kept
        self._taken_b: dict[int, int] = {}
        self._refused_a: set[int] = set()
        self._refused_b: set[int] = set()

    # Each loop below grows one whole-library container. Grown side by side in one loop, the
    # containers reach their resize thresholds on the same entry, and their resizes (each a
    # C call faulting in a new table of megabytes, 15-19 ms at 400,000 entries alone, 40-48 ms
    # inside a 2 x 200k reconcile, where the loop was seen refused the GIL that long) can run
    # back to back with no point between where the thread hands the GIL over. The matches are
    # listed first (a list grows by reallocation, a few pages at a time), then put in each
    # container in turn.

    def confirm(self, rule: str, edges: Iterable[tuple[int, int]]) -> None:
        """Keep the earlier matches that are still candidates under ``rule``."""
        result, kept = self.result, self._kept
        matched = result.matched
        # (The same pair twice is kept twice over: the same entries, the same values.)
        found = [(a, b) for a, b in edges if kept.get(a) == b and a not in matched]
        for a, b in found:
            matched[a] = b
        rule_of = result.rule_of
        for a, _ in found:
            rule_of[a] = rule
        kept_set = result.kept
        for a, _ in found:
            kept_set.add(a)
        taken_b = self._taken_b
        for a, b in found:
            taken_b[b] = a
        _drain(found)

    def release(self) -> PairResult:
        """The result, with what the matcher kept on the side (a whole library of it) freed a
        slice at a time (see :func:`_drain`); no rule can be applied afterwards."""
        _drain(self._taken_b)
        _drain(self._refused_a)
        _drain(self._refused_b)
        return self.result

    def apply(self, rule: str, edges: Iterable[tuple[int, int]]) -> None:
        """Match the entries still free that are each other's only candidate under ``rule``."""
        self._kept = {}
        result, taken_b = self.result, self._taken_b
        refused_a, refused_b = self._refused_a, self._refused_b
        matched = result.matched
        free = [
            (a, b)
            for a, b in edges
            if not (a in matched or b in taken_b or a in refused_a or b in refused_b)
        ]
        cand_a: dict[int, int] = {}
        for a, b in free:
            cand_a[a] = b if cand_a.get(a, b) == b else _MANY
        cand_b: dict[int, int] = {}
        for a, b in free:
            cand_b[b] = a if cand_b.get(b, a) == a else _MANY
        _drain(free)
        pairs = [(a, b) for a, b in cand_a.items() if b != _MANY and cand_b[b] == a]
        for a, b in pairs:
            matched[a] = b
        rule_of = result.rule_of
        for a, _ in pairs:
            rule_of[a] = rule
        for a, b in pairs:
            taken_b[b] = a
        _drain(pairs)
        ambiguous = result.ambiguous
        for side, refused, taken in ((cand_a, refused_a, matched), (cand_b, refused_b, taken_b)):
            left = [x for x in side if x not in taken]
            for x in left:
                refused.add(x)
            for x in left:
                ambiguous[x] = rule
            _drain(left)
        # A whole library's candidates: freed a slice at a time (see _drain).
        _drain(cand_a)
        _drain(cand_b)


def match_pair(
    servers: tuple[str, str],
    kept: Mapping[int, int],
    rules: Sequence[tuple[str, Sequence[tuple[int, int]]]],
) -> PairResult:
    """Match two servers' entries from candidate pairs, rule by rule (pure).

    ``kept`` holds earlier matches (first-server entry -> second-server entry); one stays when
    the pair is still a candidate under some rule. Then each rule in order, over the entries
    still free: a pair matches when each side is the other's only candidate; an entry with
    several candidates, or whose only candidate has several, is ambiguous and takes no part in
    later rules.
    """
    matcher = PairMatcher(servers, kept)
    if kept:
        for rule, edges in rules:
            matcher.confirm(rule, edges)
    for rule, edges in rules:
        matcher.apply(rule, edges)
    return matcher.result


def build_groups(
    pairs: Iterable[PairResult], entry_server: Mapping[int, int]
) -> tuple[dict[int, int | None], set[int]]:
    """Join pairwise matches into groups (pure); return (entry -> group or None, conflicts).

    A group is a connected set of matched entries, named by its smallest entry. A group that
    would hold two entries of one server is refused whole (its entries map to None and are
    listed as conflicts). Entries ambiguous in some pair and matched in none are refused too.
    Entries in no group are on their own.
    """
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    ambiguous: set[int] = set()
    for pair in pairs:
        ambiguous.update(pair.ambiguous)
        for a, b in pair.matched.items():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
            parent.setdefault(a, a)
            parent.setdefault(b, b)
    # A bit per server in each group; a bit seen twice is a conflict.
    seen: dict[int, int] = {}
    bad: set[int] = set()
    for entry in list(parent):
        root = find(entry)
        bit = 1 << entry_server.get(entry, 0)
        mask = seen.get(root, 0)
        if mask & bit:
            bad.add(root)
        seen[root] = mask | bit
    _drain(seen)
    # The union-find map becomes the result (every entry now points at its root).
    groups = cast(dict[int, "int | None"], parent)
    conflicts: set[int] = set()
    for entry, group in groups.items():
        if group in bad:
            groups[entry] = None
            conflicts.add(entry)
    for entry in ambiguous:
        groups.setdefault(entry, None)
    return groups, conflicts


# ---------------------------------------------------------------------- the indexed identity

#: Called with (server, ids) for item ids a server sent that the index does not hold yet.
UnknownHook = Callable[[str, set[str]], None]
#: Called with the change when a first scan moved other servers' id maps (must not block).
ChangeHook = Callable[[IdentityChange], None]


class IndexedIdentity:
    """Match items across servers through the library index (see the module docstring)."""

    complete = True

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        clock: Clock,
        *,
        page_size: int = PAGE_SIZE,
        on_page: PageHook | None = None,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._clock = clock
        self._names = [s.name for s in config.servers]
        self._rank = {name: i for i, name in enumerate(self._names)}
        self._index = LibraryIndex(config.ledger, config.servers)
        self._page_size = page_size
        self._on_page = on_page
        self._clients: dict[str, JellyfinClient] = {}
        self._builds: dict[str, asyncio.Task[BaseException | None]] = {}
        self._ready: set[str] = set()
        self._match_lock = asyncio.Lock()
        #: The last match, while the id maps are in line with it (None: match in full).
        self._state: _MatchState | None = None
        #: Matches of every item, and matches of only what a change was linked to.
        self.full_matches = 0
        self.partial_matches = 0
        self._status: dict[str, Any] = {"strategy": "indexed", "pairs": [], "servers": {}}
        self._problems_logged: set[tuple[str, str]] = set()
        self._not_found: set[tuple[str, str]] = set()
        #: Told about ids the index does not hold (the reconciler re-reads them).
        self.on_unknown: UnknownHook | None = None
        #: Told about id-map changes made by first scans (the reconciler catches up).
        self.on_change: ChangeHook | None = None
        self._opened = False

    def __repr__(self) -> str:
        return f"IndexedIdentity(servers={self._names})"

    @property
    def index(self) -> LibraryIndex:
        """The library index this identity matches over."""
        return self._index

    # ------------------------------------------------------------------ lifecycle

    async def start(self, clients: Mapping[str, JellyfinClient]) -> None:
        """Open the index (the ledger must be open already)."""
        self._clients = dict(clients)
        if not self._opened:
            await self._index.open()
            self._opened = True

    async def close(self) -> None:
        """Cancel scans under way and close the index."""
        tasks = [t for t in self._builds.values() if not t.done()]
        self._builds.clear()
        try:
            await cancel_and_wait(tasks, logger)
        finally:
            if self._opened:
                self._opened = False
                await self._index.close()

    def server_reachable(self, server: str) -> None:
        """Start the server's first scan in the background (once per process)."""
        if server in self._clients and server not in self._ready:
            self._first_build(server)

    # ------------------------------------------------------------------ ItemIdentity

    async def siblings(self, server: str, remote_ids: Iterable[str]) -> dict[str, set[str]]:
        """Items of ``server`` sharing a provider-id key with each of ``remote_ids``."""
        await self.ensure_ready(server)
        return await self._index.siblings(server, remote_ids)

    async def canonical_items(self, server: str, remote_ids: Iterable[str]) -> dict[str, str]:
        """Return remote id -> canonical key for the mapped ids; ask for unknown ones."""
        wanted = list(remote_ids)
        await self.ensure_ready(server)
        found = await self._index.canonical_of(server, wanted)
        unknown = {r for r in wanted if r not in found and (server, r) not in self._not_found}
        if unknown:
            indexed = await self._index.in_index(server, unknown)
            fresh = unknown - indexed
            if fresh and self.on_unknown is not None:
                self.on_unknown(server, fresh)
        return found

    async def remote_items(self, server: str, items: Iterable[str]) -> dict[str, str]:
        """Return canonical key -> the server's item id for the keys it maps."""
        await self.ensure_ready(server)
        return await self._index.remote_of(server, items)

    async def ensure_ready(self, server: str) -> None:
        """Wait for the server's first scan of this process (and any other first scan under way).

        When the scan fails, an index left by an earlier complete scan is used; without one
        the scan's error is raised (the caller retries later).
        """
        if server in self._ready:
            return
        task = self._first_build(server)
        error = await asyncio.shield(task)
        others = [t for n, t in self._builds.items() if n != server and not t.done()]
        if others:
            await asyncio.wait([asyncio.shield(t) for t in others])
        if error is None:
            return
        if await self._index.complete(server):
            logger.warning(
                "[%s] cannot rescan the library (%s); matching with the index of the last scan",
                server,
                error,
            )
            self._ready.add(server)
            return
        raise error

    async def refresh(self, servers: Iterable[str] | None = None) -> IdentityChange:
        """Rescan the servers' libraries (those with a client by default), then match again.

        One server at a time: a scan holds whole-library temporaries (the listing's ids, the
        entries it saw) and its parsing, not the server, bounds its time on a small machine,
        so scanning two at once doubled the peak memory for no gain (2 x 200k items: 185 MB
        after concurrent scans, 141 MB after sequential ones; the reconcile no slower). A
        server whose scan fails keeps its previous index; the failure is logged.
        """
        names = [n for n in (servers or self._names) if n in self._clients]
        try:
            results: list[ScanResult | BaseException] = []
            for n, name in enumerate(names):
                try:
                    # A new index file is built in bulk across all of them: its indexes are
                    # made once, after the last (the next ones are first scans too).
                    results.append(await self._scan(name, more=n < len(names) - 1))
                except Exception as err:  # noqa: BLE001 - that server's failure, logged below
                    results.append(err)
        except BaseException:
            self._state = None  # pages stored by the scans were not matched
            raise
        dirty: set[int] | None = set()
        gone: dict[str, set[str]] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                self._state = None
                raise result
            if isinstance(result, BaseException):
                logger.warning("[%s] library rescan failed: %s", name, result)
                dirty = None  # what it stored before failing is not listed
            else:
                self._ready.add(name)
                gone[name] = result.gone
                if dirty is not None and result.dirty is not None:
                    dirty |= result.dirty
                else:
                    dirty = None
        if dirty is None:
            return await self.rematch()
        if not dirty and self._state is not None:
            # Nothing a match depends on changed: only the scan times move on the status.
            scanned = await self._index.scanned_at()
            for name, about in self._status.get("servers", {}).items():
                about["scanned_at_ms"] = scanned.get(name)
            return IdentityChange()
        return await self._rematch_some(dirty, gone)

    async def library_changed(
        self, server: str, changed: Iterable[str], removed: Iterable[str]
    ) -> IdentityChange:
        """Re-read items added or updated on ``server``, drop removed ones, match again."""
        changed = set(changed)
        removed = set(removed) - changed
        client = self._clients[server]
        index = self._index
        # What the items were linked to before: a match they leave may free or settle others.
        before = await index.entries_of(server, changed | removed)
        linked = await index.neighbours(before.values()) if before else set()
        moved = 0
        series = 0
        after: dict[str, int] = {}
        if changed:
            stored, series = await index.refresh_items(client, server, changed)
            moved += stored + series
            after = await index.entries_of(server, changed)
            self._not_found.update((server, r) for r in changed - after.keys())
            self._not_found.difference_update((server, r) for r in after)
            # Read back outside the synced libraries, an item leaves the index.
            moved += len((before.keys() & changed) - after.keys())
        if removed:
            moved += await index.remove_items(server, removed)
        if not moved:
            return IdentityChange()  # nothing a match depends on changed (artwork, say)
        if series:
            return await self.rematch()  # a series' ids moved: all its episodes re-keyed
        dirty = set(before.values()) | set(after.values()) | linked
        return await self._rematch_some(dirty, {server: changed | removed})

    def status(self) -> dict[str, Any]:
        """Matching counts per server pair with samples (from the last match)."""
        return self._status

    # ------------------------------------------------------------------ matching

    async def rematch(self) -> IdentityChange:
        """Match every server pair again and bring the ledger's id maps in line."""
        async with self._match_lock:
            return await self._rematch_all()

    async def _rematch_all(self) -> IdentityChange:
        self._state = None  # until the id maps are in line with a complete match
        self.full_matches += 1
        started = self._clock.monotonic()
        # What the scans freed goes back before the match's own whole-library structures.
        await asyncio.to_thread(release_free_memory)
        sids = [self._index.sid(n) for n in self._names]
        entry_server, counts = await asyncio.to_thread(
            _EntryServers.of, await self._index.entry_server_table(), sids
        )
        present = [n for n in self._names if counts[self._index.sid(n)]]
        pairs: list[PairResult] = []
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                pairs.append(await self._match(a, b))
        groups, conflicts = await asyncio.to_thread(_compact_groups, pairs, entry_server)
        state = _MatchState(present, {}, conflicts, len(entry_server))
        while pairs:
            pair = pairs.pop(0)
            # Kept in compact form: the pair's dicts go (in the thread) once it is built.
            state.pairs[pair.servers] = await asyncio.to_thread(
                self._keep_pair, pair, conflicts, entry_server
            )
            del pair
        del entry_server  # large; not needed to write the id maps
        await self._update_status(state, counts)
        change = await self._apply(groups)
        del groups
        self._state = state
        # The whole library's temporaries (candidate pairs, groups, rows) are free now; hand
        # their pages back so the next pass, on another thread, does not stack on them.
        await asyncio.to_thread(release_free_memory)
        logger.info(
            "matched items of %s in %.1f s: %d mappings written, %d dropped, %d retired",
            ", ".join(present) or "no server",
            self._clock.monotonic() - started,
            change.mapped,
            change.unmapped,
            change.retired,
        )
        return change

    def _keep_pair(
        self, pair: PairResult, conflicts: set[int], entry_server: Mapping[int, int]
    ) -> _PairState:
        """The kept form of a complete match of one pair, with its unmatched sample; empties
        ``pair`` (CPU-bound for a large library, and so is freeing its dicts: run it in a
        thread, so neither happens on the event loop)."""
        _drain(pair.kept)
        unmatched = self._unmatched_sample(pair, conflicts, entry_server)
        found = _PairState.of(pair)
        found.unmatched = unmatched
        _drain(pair.matched)
        _drain(pair.rule_of)
        _drain(pair.ambiguous)
        return found

    async def _rematch_some(self, dirty: set[int], stale: Mapping[str, set[str]]) -> IdentityChange:
        """Match again only what ``dirty`` entries are linked to (directly or not), and
        bring the id maps of those in line; a full :meth:`rematch` when there is no complete
        match to start from, the servers present changed, or too much is linked.

        ``dirty``: the entries that changed or left (with what they were linked to before);
        ``stale``: per server, the remote ids whose mapping may have lost its item. Matching
        results depend only on the entries an entry is linked to, so those outside the
        linked set keep their groups and keys: the result is the full match's.
        """
        async with self._match_lock:
            state = self._state
            index = self._index
            if state is None:
                return await self._rematch_all()
            started = self._clock.monotonic()
            self._state = None
            # Counted on the index's other connection while this one follows the links.
            counting = asyncio.create_task(index.counts(), name="jfsync-index-counts")
            try:
                scope = await index.closure(dirty, max(INCREMENTAL_LIMIT, state.entries // 20))
                by_name = await counting
            finally:
                await cancel_and_wait([counting], logger)
            present = [n for n in self._names if by_name.get(n)]
            if scope is None or present != state.present:
                return await self._rematch_all()
            state.entries = sum(by_name.values())
            self.partial_matches += 1
            entry_server = await index.entry_servers(scope)
            pairs: list[PairResult] = []
            for i, a in enumerate(present):
                for b in present[i + 1 :]:
                    pairs.append(await self._match(a, b, scope))
            groups, conflicts = build_groups(pairs, entry_server)
            state.conflicts = (state.conflicts - scope) | conflicts
            for pair in pairs:
                pair.kept.clear()
                kept = state.pairs[pair.servers]
                kept.replace(scope, pair)
                # Folding rebuilds the pair's arrays (a whole library): off the loop.
                await asyncio.to_thread(kept.matches.fold)
                sample = [e for e in kept.unmatched if e not in scope]
                sample += self._unmatched_sample(pair, conflicts, entry_server)
                kept.unmatched = sorted(sample)[:SAMPLE_SIZE]
            counts = Counter({index.sid(n): c for n, c in by_name.items()})
            await self._update_status(state, counts)
            change = await self._apply(groups, scope, stale)
            self._state = state
            logger.debug(
                "matched %d linked items of %s again in %.3f s: %d mappings written, "
                "%d dropped, %d retired",
                len(scope),
                ", ".join(present),
                self._clock.monotonic() - started,
                change.mapped,
                change.unmapped,
                change.retired,
            )
            return change

    async def _match(self, a: str, b: str, scope: set[int] | None = None) -> PairResult:
        """Match one pair, reading one rule's candidates at a time (twice with earlier matches:
        first to confirm them, then to match the rest); only the entries in ``scope`` (a set
        closed under links) when given. For a whole library the matching runs in a worker
        thread, and so does freeing each rule's candidate pairs (hundreds of thousands of
        tuples): the event loop goes on meanwhile."""
        index = self._index

        async def edges(rule: Rule) -> list[tuple[int, int]]:
            if scope is None:
                return await index.edges(rule, a, b)
            return await index.scoped_edges(rule, a, b, scope)

        if scope is None:
            kept = await asyncio.to_thread(_dict_of, await index.mapped_pairs(a, b))
        else:
            kept = dict(await index.scoped_mapped_pairs(a, b, scope))
        matcher = PairMatcher((a, b), kept)
        small = scope is not None
        if kept:
            for rule in RULES:
                found = await edges(rule)
                if small:
                    matcher.confirm(rule, found)
                else:
                    await asyncio.to_thread(_consume, matcher.confirm, rule, found)
            if small:
                kept.clear()
            else:
                await asyncio.to_thread(_drain, kept)  # a whole library's: see _drain
            del kept
        for rule in RULES:
            found = await edges(rule)
            if small:
                matcher.apply(rule, found)
            else:
                await asyncio.to_thread(_consume, matcher.apply, rule, found)
        return matcher.result if small else await asyncio.to_thread(matcher.release)

    async def _apply(
        self,
        groups: Mapping[int, int | None],
        scope: set[int] | None = None,
        stale: Mapping[str, set[str]] | None = None,
    ) -> IdentityChange:
        """Choose each group's canonical key and write the id-map changes to the ledger.

        Changes are written while the groups stream in, a chunk per transaction, each chunk
        with its own forgets (so a key never points at a new item with an old history).
        With ``scope`` (entries closed under links) only their groups are looked at, and only
        the remote ids in ``stale`` are checked for a mapping whose item left the index.
        """
        index = self._index
        pages: AsyncIterator[list[GroupRow]]
        if scope is None:
            held = await index.mapped_keys()
            pages = index.group_rows(groups)
        else:
            rows = [row async for page in index.group_rows(groups, scope=scope) for row in page]
            held = await index.held_keys(
                {r.key for r in rows if r.key is not None} | {r.remote_id for r in rows},
                {f"{r.server}:{r.remote_id}" for r in rows},
            )
            pages = _once(rows)
        # Every key a server holds: hundreds of thousands after a first match, so put
        # together in a worker thread (one set union walks them all without a pause).
        taken = await asyncio.to_thread(_union, held.values())
        claimed: KeySet = {}
        plans = {n: _ServerPlan() for n in self._names}
        retire: set[str] = set()
        change = IdentityChange()
        # One chunk is written (in the ledger's thread) while the next groups are read.
        writing: asyncio.Task[None] | None = None
        # Groups come in the order of the earliest server's ids, so its mappings are written
        # in key order, chunk after chunk, page after page. A later server's come in no
        # order of its own ids: written a chunk per transaction, each chunk would rewrite
        # most pages of that server's part of the id map (the bytes written grew with the
        # square of the library). Where that server has no mapping yet (its first match:
        # nothing to forget or drop, only mappings to add), they are set aside as they come
        # and recorded in one transaction at the end (Ledger.remap_items ``stage``).
        staging = {} if scope is not None else {n: 0 for n in self._names[1:] if not held.get(n)}

        async def flush(name: str, *, final: bool = False) -> None:
            nonlocal change, writing
            plan = plans[name]
            staged = staging.get(name)
            if not final and len(plan) < REMAP_CHUNK:
                return
            if not plan and not (final and staged):
                return
            plans[name] = _ServerPlan()
            change = change | IdentityChange(
                frozenset({name}), len(plan.mappings), len(plan.unmap), 0
            )
            if writing is not None:
                await writing
            if staged is None:
                remap = self._ledger.remap_items(
                    name,
                    # In key order, the id map's b-tree is written page after page.
                    mappings=sorted(plan.mappings, key=lambda m: m.remote_id),
                    unmapped=plan.unmap,
                    forget=sorted(plan.forget),
                )
            else:
                staging[name] = staged + len(plan.mappings)
                remap = self._ledger.remap_items(
                    name,
                    unmapped=plan.unmap,
                    forget=sorted(plan.forget),
                    stage=plan.mappings,
                    fresh_stage=not staged,
                    staged=staging[name] if final else None,
                )
            writing = asyncio.create_task(remap, name=f"jfsync-remap[{name}]")

        try:
            current: list[GroupRow] = []
            async for page in pages:
                for start, row in enumerate(page):
                    if current and row.group != current[0].group:
                        self._plan_group(current, plans, claimed, taken, held, retire)
                        current = []
                    current.append(row)
                    if start % 250 == 249:
                        await asyncio.sleep(0)  # let the loop run between slices of a page
                for name in self._names:
                    await flush(name)
            if current:
                self._plan_group(current, plans, claimed, taken, held, retire)
            for name in self._names:
                among = None if stale is None else stale.get(name)
                if (stale is None or among) and await index.complete(name):
                    for remote_id, key in await index.stale_mappings(name, among):
                        plans[name].unmap.append(remote_id)
                        plans[name].forget.add(key)
                        retire.add(key)
                await flush(name, final=True)
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing
        # The whole library's keys (and, after a first match, most of their strings) are
        # freed in a worker thread, not on the event loop.
        await asyncio.to_thread(_clear, claimed, taken, *held.values())
        if retire:
            retired = await self._ledger.retire_items(sorted(retire))
            change = change | IdentityChange(retired=len(retired))
        return change

    def _plan_group(
        self,
        rows: list[GroupRow],
        plans: dict[str, _ServerPlan],
        claimed: KeySet,
        taken: KeySet,
        held: Mapping[str, KeySet],
        retire: set[str],
    ) -> None:
        """Decide one group's canonical key and record the id-map changes it needs.

        The key is the current key of the member on the earliest server that has one (not
        already given to another group in this pass); a group without one takes the id of its
        member on the earliest server, or a server-prefixed form of it when that key is used.
        """
        if rows[0].refused:
            for row in rows:
                if row.key is not None:
                    plans[row.server].unmap.append(row.remote_id)
                    plans[row.server].forget.add(row.key)
                    retire.add(row.key)
            return
        rank = self._rank
        members = sorted(rows, key=lambda r: rank[r.server])
        chosen = next((r.key for r in members if r.key is not None and r.key not in claimed), None)
        if chosen is None:
            first = members[0]
            chosen = first.remote_id
            serial = 1
            while chosen in claimed or chosen in taken:
                serial += 1
                chosen = f"{first.server}:{first.remote_id}" + (f"#{serial}" if serial > 2 else "")
        claimed[chosen] = None
        for row in members:
            if row.key == chosen:
                continue
            plan = plans[row.server]
            plan.mappings.append(
                ItemMapping(
                    remote_id=row.remote_id,
                    item=chosen,
                    item_type=row.item_type,
                )
            )
            if chosen in held.get(row.server, ()):
                plan.forget.add(chosen)  # another item of this server held the key before
            if row.key is not None:
                plan.forget.add(row.key)
                retire.add(row.key)

    async def _update_status(self, state: _MatchState, counts: Mapping[int, int]) -> None:
        """Matching counts per pair with samples, from the kept match state: its work grows
        with the ambiguous and conflicting entries, not with the library."""
        index = self._index
        scanned = await index.scanned_at()
        conflicts = state.conflicts
        wanted: set[int] = set()
        summaries: list[dict[str, Any]] = []
        for found in state.pairs.values():
            a, b = found.servers
            matches = found.matches
            sid_a, sid_b = index.sid(a), index.sid(b)
            sids = (sid_a, sid_b)
            sides = await index.entry_servers(set(found.ambiguous) | conflicts)
            amb_a = [e for e in found.ambiguous if sides.get(e) == sid_a]
            amb_b = [e for e in found.ambiguous if sides.get(e) == sid_b]
            bad = {e for e in conflicts if sides.get(e) in sids}
            # A conflict refuses its whole group: both ends of a match are bad, or neither.
            bad_matched = {e: m for e in bad if (m := matches.get(e)) is not None}
            by_rule = found.rules.copy()
            by_rule.subtract(rule for _, rule in bad_matched.values())
            ambiguous = set(amb_a) | set(amb_b) | bad
            amb_count = Counter(sides[e] for e in ambiguous if e in sides)
            matched = len(matches) - len(bad_matched)
            un_a = counts.get(sid_a, 0) - matched - amb_count[sid_a]
            un_b = counts.get(sid_b, 0) - matched - amb_count[sid_b]
            sample_matched = list(
                itertools.islice(
                    ((x, y, rule) for x, y, rule in matches.items() if x not in bad), SAMPLE_SIZE
                )
            )
            sample_ambiguous = sorted(ambiguous)[:SAMPLE_SIZE]
            wanted.update(e for x, y, _ in sample_matched for e in (x, y))
            wanted.update(sample_ambiguous)
            wanted.update(found.unmatched)
            summaries.append(
                {
                    "pair": found,
                    "matched": matched,
                    "by_rule": by_rule,
                    "ambiguous": ambiguous,
                    "unmatched": {a: un_a, b: un_b},
                    "sample_matched": sample_matched,
                    "sample_ambiguous": sample_ambiguous,
                    "sample_unmatched": found.unmatched,
                }
            )
        described = await index.describe(wanted)
        out_pairs: list[dict[str, Any]] = []
        for summary in summaries:
            pair = summary["pair"]
            a, b = pair.servers
            by_rule = summary["by_rule"]
            ambiguous_rows = [
                {**described[e].as_dict(), "rule": pair.ambiguous.get(e, "group")}
                for e in summary["sample_ambiguous"]
                if e in described
            ]
            for e in summary["ambiguous"]:
                item = described.get(e)
                key = (f"{a}+{b}", str(e))
                if item is not None and key not in self._problems_logged:
                    self._problems_logged.add(key)
                    logger.warning(
                        "[%s] %s matches more than one item on %s and %s; not synced",
                        item.server,
                        item.label(),
                        a,
                        b,
                    )
            out_pairs.append(
                {
                    "servers": [a, b],
                    "matched": summary["matched"],
                    "unmatched": sum(summary["unmatched"].values()),
                    "ambiguous": len(summary["ambiguous"]),
                    "unmatched_by_server": summary["unmatched"],
                    "matched_by_rule": {r: by_rule.get(r, 0) for r in RULES},
                    "samples": {
                        "matched": [
                            {
                                a: described[x].label(),
                                b: described[y].label(),
                                "rule": rule,
                            }
                            for x, y, rule in summary["sample_matched"]
                            if x in described and y in described
                        ],
                        "unmatched": [
                            described[e].as_dict()
                            for e in summary["sample_unmatched"]
                            if e in described
                        ],
                        "ambiguous": ambiguous_rows,
                    },
                }
            )
        self._status = {
            "strategy": "indexed",
            "matched_at_ms": self._clock.wall_ms(),
            "servers": {
                n: {"items": counts.get(index.sid(n), 0), "scanned_at_ms": scanned.get(n)}
                for n in self._names
            },
            "pairs": out_pairs,
        }

    def _unmatched_sample(
        self, pair: PairResult, conflicts: set[int], entry_server: Mapping[int, int]
    ) -> list[int]:
        """The first entries (by id) among those of ``entry_server`` on the pair's servers
        that match nothing."""
        a, b = pair.servers
        sids = (self._index.sid(a), self._index.sid(b))
        matched, ambiguous = pair.matched, pair.ambiguous
        # A generator: built from Python, not in one C call over them all (see _drain).
        partners = set(b for b in matched.values())
        found = heapq.nsmallest(
            SAMPLE_SIZE,
            (
                e
                for e, sid in entry_server.items()
                if sid in sids
                and e not in matched
                and e not in partners
                and e not in ambiguous
                and e not in conflicts
            ),
        )
        _drain(partners)
        return found

    # ------------------------------------------------------------------ scanning

    def _first_build(self, server: str) -> asyncio.Task[BaseException | None]:
        task = self._builds.get(server)
        if task is None or (task.done() and (task.cancelled() or task.result() is not None)):
            task = asyncio.create_task(self._build(server), name=f"jfsync-index[{server}]")
            self._builds[server] = task
        return task

    async def _build(self, server: str) -> BaseException | None:
        """Scan the server and match; return the error instead of raising it."""
        try:
            await self._scan(server)
        except asyncio.CancelledError:
            raise
        except JfsyncError as err:
            logger.warning("[%s] library scan failed: %s", server, err)
            return err
        try:
            change = await self.rematch()
        except asyncio.CancelledError:
            raise
        except JfsyncError as err:
            logger.warning("item matching failed after scanning %s: %s", server, err)
            return err
        self._ready.add(server)
        # Servers still on their first scan catch up after it anyway; only those already
        # serving need telling that their id map moved.
        others = (change.servers - {server}) & self._ready
        if others and self.on_change is not None:
            # Not awaited here: whoever catches up may itself be waiting for this scan.
            self.on_change(IdentityChange(frozenset(others), change.mapped))
        return None

    async def _scan(self, server: str, *, more: bool = False) -> ScanResult:
        started = self._clock.monotonic()
        result = await self._index.scan(
            self._clients[server],
            server,
            self._clock.wall_ms(),
            page_size=self._page_size,
            on_page=self._on_page,
            more_first_scans=more,
        )
        logger.info(
            "[%s] library indexed in %.1f s: %d items (%d new or changed), %d series, %d removed",
            server,
            self._clock.monotonic() - started,
            result.items,
            result.changed,
            result.series,
            result.removed,
        )
        return result


def _dict_of(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """``dict(pairs)``, emptying ``pairs``: built and freed from Python, a slice at a time
    (run it in a worker thread; see :func:`_drain`)."""
    found: dict[int, int] = {}
    for a, b in pairs:
        found[a] = b
    _drain(pairs)
    return found


def _consume(
    step: Callable[[str, list[tuple[int, int]]], None], rule: str, pairs: list[tuple[int, int]]
) -> None:
    """``step(rule, pairs)``, then empty ``pairs`` (in a worker thread, a slice at a time: a
    rule's candidate pairs of a whole library, freed on the event loop, stalled it for tens
    of milliseconds)."""
    try:
        step(rule, pairs)
    finally:
        _drain(pairs)


def _union(sets: Iterable[KeySet]) -> KeySet:
    """Every key of ``sets``, added from Python (a whole library's keys: run it in a thread;
    one ``update`` of them all holds the GIL without a pause)."""
    found: KeySet = {}
    for one in sets:
        for key in one:
            found[key] = None
    return found


def _clear(*containers: KeySet) -> None:
    """Empty each container a slice at a time (a whole library's keys: run it in a worker
    thread)."""
    for container in containers:
        _drain(container)


#: Values per bucket of :func:`_sorted_ints`, as a shift (8,192 apart at most: a sort of a
#: bucket takes well under a millisecond).
_BUCKET_BITS = 13


def _sorted_ints(values: Iterable[int]) -> array[int]:
    """``values`` sorted, in an array of signed 64-bit ints.

    Meant for a whole library's entries, in a worker thread: one ``sorted()`` of hundreds of
    thousands of ints is a single C call holding the GIL all along (it stalled the event loop
    50 ms at 3 x 100k items). The values are spread into buckets by their high bits in Python
    (which lets the loop run every few milliseconds) and each bucket is sorted on its own.
    """
    buckets: dict[int, list[int]] = {}
    for value in values:
        bucket = buckets.get(value >> _BUCKET_BITS)
        if bucket is None:
            buckets[value >> _BUCKET_BITS] = [value]
        else:
            bucket.append(value)
    out = array("q")
    for high in sorted(buckets):
        bucket = buckets.pop(high)
        bucket.sort()
        out.extend(bucket)
    return out


class _EntryServers(Mapping[int, int]):
    """entry -> server id for a whole index in one byte an entry (a table indexed by entry,
    0 where there is none), where a dict of int objects took about 80."""

    __slots__ = ("_size", "_table")

    def __init__(self, table: bytearray, size: int) -> None:
        self._table = table
        self._size = size

    @staticmethod
    def of(
        found: bytearray | dict[int, int], sids: Iterable[int]
    ) -> tuple[Mapping[int, int], Counter[int]]:
        """The mapping over what :meth:`LibraryIndex.entry_server_table` returned (a dict, for
        entries or server ids that do not fit a table, as it is), with the entries of each of
        ``sids`` (the configured servers' ids; counted byte by byte in C on a table, walked in
        Python on a dict: run it in a thread)."""
        if isinstance(found, dict):
            return found, Counter(found.values())
        counts = Counter({s: n for s in sids if 0 <= s < 255 and (n := found.count(s + 1))})
        return _EntryServers(found, sum(counts.values())), counts

    def __getitem__(self, entry: int) -> int:
        table = self._table
        if 0 <= entry < len(table) and table[entry]:
            return table[entry] - 1
        raise KeyError(entry)

    def get(self, entry: int, default: Any = None) -> Any:
        table = self._table
        if 0 <= entry < len(table) and table[entry]:
            return table[entry] - 1
        return default

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, int) and self.get(entry) is not None

    def __iter__(self) -> Iterator[int]:
        return (entry for entry, code in enumerate(self._table) if code)

    def items(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        """(entry, server id) in entry order."""
        return ((entry, code - 1) for entry, code in enumerate(self._table) if code)

    def __len__(self) -> int:
        return self._size


class _Groups(Mapping[int, "int | None"]):
    """entry -> group (None: refused) of a whole match in two sorted arrays (16 bytes an
    entry, where the union-find dict took about 80), for the id-map pass to stream."""

    __slots__ = ("_groups", "_keys")

    def __init__(self, keys: array[int], groups: array[int]) -> None:
        self._keys = keys
        self._groups = groups

    @staticmethod
    def of(groups: Mapping[int, int | None]) -> _Groups:
        """The compact form of ``groups`` (entries and groups are positive index ids)."""
        keys = _sorted_ints(groups)
        values = array("q", (-1 if (g := groups[k]) is None else g for k in keys))
        return _Groups(keys, values)

    def __getitem__(self, entry: int) -> int | None:
        keys = self._keys
        i = bisect.bisect_left(keys, entry)
        if i < len(keys) and keys[i] == entry:
            group = self._groups[i]
            return None if group < 0 else group
        raise KeyError(entry)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def items(self) -> Iterator[tuple[int, int | None]]:  # type: ignore[override]
        """(entry, group) in entry order."""
        return ((e, None if g < 0 else g) for e, g in zip(self._keys, self._groups, strict=True))

    def __len__(self) -> int:
        return len(self._keys)


def _compact_groups(
    pairs: Iterable[PairResult], entry_server: Mapping[int, int]
) -> tuple[Mapping[int, int | None], set[int]]:
    """:func:`build_groups` with its result in compact form (CPU-bound: run it in a thread;
    the union-find dict is freed there too)."""
    groups, conflicts = build_groups(pairs, entry_server)
    compact = _Groups.of(groups)
    _drain(groups)
    return compact, conflicts


#: Rules by their code in :class:`_Matches`.
_RULE_CODE: dict[str, int] = {rule: code for code, rule in enumerate(RULES)}


class _Matches:
    """One pair's matches kept between rematches: first-server entry -> (second-server
    entry, rule).

    A whole library's matches sit in sorted arrays (17 bytes a match, where two dicts of int
    objects took about 110), looked up by bisection; what incremental rematches change since
    they were built is kept in a small dict and set on top, and folded into the arrays when it
    grows past an eighth of them.
    """

    __slots__ = ("_changed", "_dropped", "_keys", "_rules", "_size", "_values")

    #: Changes kept on top of the arrays before they are folded in, at least.
    FOLD_MIN = 1000

    def __init__(self, matched: Mapping[int, int], rule_of: Mapping[int, str]) -> None:
        self._keys = array("q")
        self._values = array("q")
        self._rules = b""
        self._changed: dict[int, tuple[int, str]] = {}
        self._dropped: set[int] = set()
        self._size = 0
        self._build(_sorted_ints(matched), matched, rule_of)

    def _build(self, keys: array[int], values: Mapping[int, int], rules: Mapping[int, str]) -> None:
        self._keys = keys
        self._values = array("q", (values[k] for k in keys))
        self._rules = bytes(_RULE_CODE[rules[k]] for k in keys)
        self._changed = {}
        self._dropped = set()
        self._size = len(keys)

    def _at(self, entry: int) -> int:
        """Index of ``entry`` in the arrays, or -1."""
        keys = self._keys
        i = bisect.bisect_left(keys, entry)
        return i if i < len(keys) and keys[i] == entry else -1

    def get(self, entry: int) -> tuple[int, str] | None:
        """(partner, rule) of a first-server entry, or None when it is not matched."""
        found = self._changed.get(entry)
        if found is not None:
            return found
        if entry in self._dropped:
            return None
        i = self._at(entry)
        return None if i < 0 else (self._values[i], RULES[self._rules[i]])

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, int) and self.get(entry) is not None

    def __len__(self) -> int:
        return self._size

    def pop(self, entry: int) -> tuple[int, str] | None:
        """Unmatch ``entry``; return what it was matched to (None: nothing)."""
        found = self.get(entry)
        if found is None:
            return None
        self._changed.pop(entry, None)
        if self._at(entry) >= 0:
            self._dropped.add(entry)
        self._size -= 1
        return found

    def put(self, entry: int, partner: int, rule: str) -> None:
        """Match ``entry`` to ``partner`` under ``rule`` (replacing any match it had)."""
        if self.get(entry) is None:
            self._size += 1
        self._changed[entry] = (partner, rule)
        self._dropped.discard(entry)

    def items(self) -> Iterator[tuple[int, int, str]]:
        """(entry, partner, rule) of every match: the arrays' in entry order, then changes."""
        changed, dropped = self._changed, self._dropped
        for entry, partner, code in zip(self._keys, self._values, self._rules, strict=True):
            if entry not in changed and entry not in dropped:
                yield entry, partner, RULES[code]
        for entry, (partner, rule) in changed.items():
            yield entry, partner, rule

    def fold(self) -> None:
        """Fold the changes into the arrays once they are more than an eighth of them
        (CPU-bound for a large library: run it in a thread)."""
        if len(self._changed) + len(self._dropped) <= max(self.FOLD_MIN, len(self._keys) // 8):
            return
        values: dict[int, int] = {}
        rules: dict[int, str] = {}
        for entry, partner, rule in self.items():
            values[entry] = partner
            rules[entry] = rule
        self._build(_sorted_ints(values), values, rules)

    def rule_counts(self) -> Counter[str]:
        """Matches per rule: on the arrays alone, a byte count per rule (in C, no walk of the
        matches); with changes on top of them, counted over :meth:`items`."""
        counts: Counter[str] = Counter()
        if self._changed or self._dropped:
            counts.update(rule for _, _, rule in self.items())
            return counts
        for code, rule in enumerate(RULES):
            if n := self._rules.count(code):
                counts[rule] = n
        return counts


@dataclass(slots=True)
class _PairState:
    """One pair's part of the last match: its matches, refusals, matches per rule and
    unmatched samples."""

    servers: tuple[str, str]
    matches: _Matches
    #: entries (of either server) refused because a rule gave them several candidates.
    ambiguous: dict[int, str]
    rules: Counter[str] = field(default_factory=Counter)
    unmatched: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, result: PairResult) -> _PairState:
        """The kept form of a complete match of the pair (CPU-bound: run it in a thread)."""
        matches = _Matches(result.matched, result.rule_of)
        return cls(result.servers, matches, dict(result.ambiguous), matches.rule_counts())

    def replace(self, scope: set[int], fresh: PairResult) -> None:
        """Drop the results of the entries in ``scope``, then take ``fresh`` ones for them."""
        matches = self.matches
        for entry in scope:
            old = matches.pop(entry)
            if old is not None:
                self.rules[old[1]] -= 1
            self.ambiguous.pop(entry, None)
        for entry, partner in fresh.matched.items():
            matches.put(entry, partner, fresh.rule_of[entry])
        self.ambiguous.update(fresh.ambiguous)
        self.rules.update(fresh.rule_of.values())


@dataclass(slots=True)
class _MatchState:
    """The last complete match, kept to match again only what a change is linked to."""

    present: list[str]
    pairs: dict[tuple[str, str], _PairState]
    conflicts: set[int]
    #: Entries in the index (all servers).
    entries: int = 0


async def _once(rows: list[GroupRow]) -> AsyncIterator[list[GroupRow]]:
    yield rows


@dataclass(slots=True)
class _ServerPlan:
    """The id-map changes one rematch makes on one server."""

    mappings: list[ItemMapping] = field(default_factory=list)
    unmap: list[str] = field(default_factory=list)
    forget: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.mappings or self.unmap or self.forget)

    def __len__(self) -> int:
        return len(self.mappings) + len(self.unmap)


__all__ = [
    "IdenticalIds",
    "IdentityChange",
    "IndexedIdentity",
    "ItemIdentity",
    "PairResult",
    "Rule",
    "build_groups",
    "match_pair",
]
