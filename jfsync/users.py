"""Matching the accounts of several servers into the people jfsync syncs.

:func:`match_users` is pure: given the config and each server's ``/Users`` answer it decides
which accounts are the same person. Explicit ``users.map`` entries come first; with
``users.match: name`` (the default) the remaining accounts match by name, case-insensitively.
Names in ``users.exclude`` are never touched on any server, disabled accounts are skipped, and a
person present on only some servers syncs among those (at least two). Everything left out is
reported, per server, so ``jfsync check`` and the status page can show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from jfsync.config import Config
from jfsync.jellyfin.wire import UserDto


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
    excluded_names = {name.casefold() for name in config.users.exclude}
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
            matched.append(MatchedUser(key=f"map:{i}", accounts=accounts))
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
        return f"user {name!r} is in users.exclude"
    for account in users_by_server[server]:
        if account.name.casefold() == folded:
            if account.is_disabled:
                return f"user {name!r} is disabled there"
            return f"user {name!r} is already matched by an earlier entry"
    return f"no user named {name!r} there"
