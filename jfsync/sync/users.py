"""Matching the accounts of several servers into the people jfsync syncs.

:func:`match_users` is pure: given the config and each server's ``/Users`` answer it decides
which accounts are the same person. Explicit ``users.map`` entries come first; with
``users.match: name`` (the default) the remaining accounts match by name, case-insensitively.
Names in ``users.exclude`` are never touched on any server, disabled accounts are skipped, and a
person present on only some servers syncs among those (at least two). Everything left out is
reported, per server, so ``jfsync check`` and the status page can show it.

A person matched by name has the canonical key ``name:<casefolded name>``; one matched by a map
entry has a key derived from the entry's content (:func:`map_entry_key`), so reordering the
list changes nobody's key. Ledgers written when map keys were positions (``map:0``) are moved
over when they are opened (:func:`plan_map_key_migration`, run by
:class:`jfsync.sync.ledger.Ledger`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from jfsync.config import Config
from jfsync.jellyfin.wire import UserDto
from jfsync.model import Register

#: Canonical keys of people matched by a ``users.map`` entry start with this.
MAP_KEY_PREFIX = "map:"
#: The keys jfsync gave map entries before they were derived from their content: the entry's
#: position in the list (``map:0``, ``map:1``, ...), which swapped people when it was reordered.
_POSITIONAL_MAP_KEY = re.compile(r"map:[0-9]+")
#: Characters left as they are in a key's names (any other is %-escaped, ``=`` and ``,`` too).
_NAME_SAFE = " '@+"


def map_entry_key(entry: Mapping[str, str]) -> str:
    """The canonical key of the person a ``users.map`` entry describes, from its content.

    ``map:<server>=<name>,...``, servers sorted, names casefolded and %-escaped: the same
    wherever the entry sits in the list and whatever order its servers are written in, and
    never equal to the key of another entry or of a person matched by name (``name:...``).
    """
    parts = [
        f"{server}={quote(name.casefold(), safe=_NAME_SAFE)}"
        for server, name in sorted(entry.items())
    ]
    return MAP_KEY_PREFIX + ",".join(parts)


def is_positional_map_key(key: str) -> bool:
    """Tell whether ``key`` is a map key of the old kind, given by position in the list."""
    return _POSITIONAL_MAP_KEY.fullmatch(key) is not None


def plan_map_key_migration(
    old: Mapping[str, Mapping[str, str | None]], entries: Sequence[Mapping[str, str]]
) -> tuple[dict[str, str], list[str]]:
    """Decide which content-derived key each positional map key of a ledger becomes.

    ``old`` holds, per positional key (``map:3``), the account name the ledger recorded for
    it on each server. A key goes to the one entry of ``entries`` that names every one of
    those accounts on its server (case-insensitively); the position is not trusted, as the
    list may have been reordered since. Returns (old key -> new key, problems): a key whose
    accounts no entry names, or several, or whose entry another key also claims, is left
    alone (its history stays under the old key) and reported.
    """
    folded = [{server: name.casefold() for server, name in entry.items()} for entry in entries]
    claims: dict[str, list[str]] = {}
    problems: list[str] = []
    for key, accounts in sorted(old.items()):
        named = {server: name.casefold() for server, name in accounts.items() if name}
        if not named:
            problems.append(f"ledger user {key}: no account names recorded; left as it is")
            continue
        found = [
            i
            for i, entry in enumerate(folded)
            if all(entry.get(server) == name for server, name in named.items())
        ]
        if len(found) != 1:
            names = ", ".join(f"{server}={name}" for server, name in sorted(named.items()))
            why = "no users.map entry names" if not found else "several users.map entries name"
            problems.append(f"ledger user {key} ({names}): {why} these accounts; left as it is")
            continue
        claims.setdefault(map_entry_key(entries[found[0]]), []).append(key)
    renames: dict[str, str] = {}
    for new, keys in claims.items():
        if len(keys) == 1:
            renames[keys[0]] = new
        else:
            problems.append(
                f"ledger users {', '.join(keys)} all match the users.map entry {new}; "
                "left as they are"
            )
    return renames, problems


@dataclass(frozen=True, slots=True)
class MatchedUser:
    """One person: their account on each server where they exist (two or more)."""

    key: str
    accounts: Mapping[str, UserDto]

    @property
    def display_name(self) -> str:
        """A readable name: the account name on the first server."""
        return next(iter(self.accounts.values())).name

    def user_id(self, server: str) -> str | None:
        """Return the user's id on ``server``, or None when they have no account there."""
        account = self.accounts.get(server)
        return account.id if account is not None else None


@dataclass(frozen=True, slots=True)
class UserMatch:
    """The outcome of matching: people to sync, and what was left out and why."""

    users: tuple[MatchedUser, ...]
    #: server -> account names present there but on no other server (nothing to sync with).
    unmatched: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: server -> account names skipped because users.exclude names them.
    excluded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: server -> account names skipped because the account is disabled.
    disabled: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Config problems found while matching (a mapped name missing on its server, ...).
    problems: tuple[str, ...] = ()

    def for_server(self, server: str) -> list[tuple[MatchedUser, UserDto]]:
        """Return (person, account) for every synced person with an account on ``server``."""
        return [(u, u.accounts[server]) for u in self.users if server in u.accounts]


def match_users(config: Config, users_by_server: Mapping[str, list[UserDto]]) -> UserMatch:
    """Match accounts across servers per ``config.users``; servers keep config order."""
    order = [s.name for s in config.servers if s.name in users_by_server]
    # users.choices with sync: false opt a person out just like users.exclude (issue 14).
    excluded_names = {name.casefold() for name in config.users.exclude}
    excluded_names |= config.users.opted_out()
    problems: list[str] = []
    excluded: dict[str, list[str]] = {}
    disabled: dict[str, list[str]] = {}
    # Per server: casefolded name -> account still available for matching.
    available: dict[str, dict[str, UserDto]] = {}
    for server in order:
        pool: dict[str, UserDto] = {}
        for account in users_by_server[server]:
            folded = account.name.casefold()
            if folded in excluded_names:
                excluded.setdefault(server, []).append(account.name)
            elif account.is_disabled:
                disabled.setdefault(server, []).append(account.name)
            elif folded in pool:
                problems.append(
                    f"server {server}: two accounts named {pool[folded].name!r} and "
                    f"{account.name!r} differ only by case; name them in users.map"
                )
            else:
                pool[folded] = account
        available[server] = pool

    matched: list[MatchedUser] = []
    for i, entry in enumerate(config.users.map):
        accounts: dict[str, UserDto] = {}
        for server in order:
            if server not in entry:
                continue
            name = entry[server]
            found = available[server].pop(name.casefold(), None)
            if found is None:
                why = _why_missing(name, server, users_by_server, excluded_names)
                problems.append(f"users.map[{i}]: {server}: {why}")
                continue
            accounts[server] = found
        if len(accounts) >= 2:
            matched.append(MatchedUser(key=map_entry_key(entry), accounts=accounts))
        elif accounts:
            # Back to the pool: one account alone syncs with nobody, but name matching may.
            ((server, alone),) = accounts.items()
            available[server][alone.name.casefold()] = alone
            problems.append(
                f"users.map[{i}]: only {server} has its account; the entry syncs nothing"
            )

    if config.users.match == "name":
        names: list[str] = []
        for server in order:
            names += [n for n in available[server] if n not in names]
        for folded in names:
            accounts = {s: available[s][folded] for s in order if folded in available[s]}
            if len(accounts) >= 2:
                matched.append(MatchedUser(key=f"name:{folded}", accounts=accounts))
                for server in accounts:
                    del available[server][folded]

    return UserMatch(
        users=tuple(matched),
        unmatched={s: tuple(a.name for a in available[s].values()) for s in order if available[s]},
        excluded={s: tuple(v) for s, v in excluded.items()},
        disabled={s: tuple(v) for s, v in disabled.items()},
        problems=tuple(problems),
    )


def _why_missing(
    name: str, server: str, users_by_server: Mapping[str, list[UserDto]], excluded: set[str]
) -> str:
    folded = name.casefold()
    if folded in excluded:
        return f"user {name!r} is in users.exclude (or opted out in users.choices)"
    for account in users_by_server[server]:
        if account.name.casefold() == folded:
            if account.is_disabled:
                return f"user {name!r} is disabled there"
            return f"user {name!r} is already matched by an earlier entry"
    return f"no user named {name!r} there"


def person_fields(config: Config, match: UserMatch) -> dict[str, frozenset[Register]]:
    """Per matched person with ``users.choices`` fields of their own: key -> registers synced.

    A choice applies to the person one of whose account names it gives (on any server).
    """
    found: dict[str, frozenset[Register]] = {}
    for person in match.users:
        names = [account.name for account in person.accounts.values()]
        choice = config.users.choice_for(names)
        if choice is not None and choice.fields is not None:
            found[person.key] = frozenset(choice.fields)
    return found
