"""``jfsync check`` online part: reach every server and say whether ``jfsync run`` would work.

For each server: reachable, Jellyfin version (10.8 refused), server id and name, whether the API
key is valid and an administrator's, its users, whether Quick Connect is enabled, its direction
(``mode``) and, with a library filter, which of its libraries sync. Then the
users are matched across servers and, for every matched user on every server, the check says
where their token would come from (configured token, configured password, Quick Connect). It
prints a short report and returns non-zero when something would stop ``jfsync run``:
unreachable server, rejected or non-admin key, 10.8, no way to get a user's token, nobody to
sync, a library filter that leaves nothing of a server in. A filter naming a library the server
does not have is printed as a warning (``jfsync run`` logs the same and goes on). Nothing
secret is ever printed: messages come from :mod:`jfsync.errors`, which never carries keys or
tokens, and configured tokens are only tried, never shown.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from jfsync.config import Config, ServerConfig
from jfsync.errors import (
    AuthRejectedError,
    BadRequestError,
    HttpStatusError,
    NotFoundError,
    ServerError,
)
from jfsync.jellyfin.api import MIN_SUPPORTED_VERSION, JellyfinClient, parse_version
from jfsync.jellyfin.wire import UserDto
from jfsync.sync.filters import scope_of
from jfsync.sync.users import UserMatch, match_users

#: Device id of the check's REST calls; no websocket uses it.
CHECK_DEVICE_ID = "jfsync-check"
#: Exit status when something would stop ``jfsync run``.
EXIT_PROBLEMS = 1
#: What each ``servers[].mode`` means, as the report says it.
MODE_TEXT = {
    "both": "both (sends its users' changes and receives the others')",
    "send": "send (its changes go to the others; jfsync never writes to it)",
    "receive": "receive (gets the others' changes; its own stay on it)",
}


@dataclass
class ServerReport:
    """What the check learned about one server."""

    index: int
    config: ServerConfig
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    usable: bool = False
    key_is_admin: bool = False
    quick_connect: bool | None = None
    users: list[UserDto] | None = None
    client: JellyfinClient | None = None

    @property
    def key(self) -> str:
        """The config key of this server, e.g. ``servers[0]``."""
        return f"servers[{self.index}]"


def run_online_check(config: Config, out: TextIO | None = None) -> int:
    """Reach every server, print the report to ``out`` (stdout), return the exit status."""
    return asyncio.run(check_online(config, out or sys.stdout))


async def check_online(config: Config, out: TextIO) -> int:
    """Run the online check inside a running loop; return the exit status."""
    async with aiohttp.ClientSession() as session:
        reports = [ServerReport(index=i, config=server) for i, server in enumerate(config.servers)]
        await asyncio.gather(*(_check_server(r, session) for r in reports))
        for report in reports:
            for line in report.lines:
                print(line, file=out)
        users_by_server = {r.config.name: r.users for r in reports if r.users is not None}
        match = match_users(config, users_by_server)
        problems = [p for r in reports for p in r.problems]
        problems += await _report_users(config, reports, match, out)
    if problems:
        print("Problems that would stop jfsync run:", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        return EXIT_PROBLEMS
    print(
        f"OK: {len(match.users)} user(s) sync across {len(config.servers)} servers.",
        file=out,
    )
    return 0


async def _check_server(report: ServerReport, session: aiohttp.ClientSession) -> None:
    server = report.config
    name = server.name
    client = JellyfinClient.for_server(server, session=session, device_id=CHECK_DEVICE_ID)
    report.client = client
    head = f"Server {name} ({client.display_url})"
    try:
        info = await client.public_info()
    except ServerError as err:
        report.lines.append(f"{head}: not reachable")
        report.problems.append(f"{name}: cannot reach the server: {_text(err)}")
        return
    version = parse_version(info.version or "")
    report.lines.append(
        f'{head}: Jellyfin {info.version or "?"}, "{info.server_name or "?"}", id {info.id or "?"}'
    )
    if version is None or version[:2] < MIN_SUPPORTED_VERSION:
        report.problems.append(
            f"{name}: Jellyfin {info.version} has no user-data write route; jfsync needs 10.9 "
            "or newer. Upgrade the server."
        )
        return
    try:
        await client.system_info()
    except AuthRejectedError as err:
        report.lines.append(f"  API key: rejected (HTTP {err.status})")
        report.problems.append(
            f"{name}: the API key was rejected; create one in Dashboard > API Keys and put it "
            f"in {report.key}.api_key (or api_key_file)"
        )
        return
    except ServerError as err:
        report.problems.append(f"{name}: {_text(err)}")
        return
    try:
        me = await client.current_user()
    except (BadRequestError, NotFoundError):
        # "Token is not owned by a user": an API key, which always has the admin role (§8.1).
        report.key_is_admin = True
        report.lines.append("  API key: valid, administrator")
    except ServerError as err:
        report.problems.append(f"{name}: {_text(err)}")
        return
    else:
        report.key_is_admin = me.is_admin
        role = "an administrator" if me.is_admin else "not an administrator"
        report.lines.append(f"  API key: valid, a token of user {me.name} ({role})")
        if not me.is_admin:
            report.problems.append(
                f"{name}: the key in {report.key}.api_key belongs to {me.name}, who is not an "
                "administrator; jfsync needs an admin API key (Dashboard > API Keys)"
            )
    try:
        report.users = await client.users()
        report.quick_connect = await client.quick_connect_enabled()
    except ServerError as err:
        report.problems.append(f"{name}: {_text(err)}")
        return
    report.usable = True
    qc = "enabled" if report.quick_connect else "disabled"
    report.lines.append(f"  Quick Connect: {qc}")
    report.lines.append("  users: " + (", ".join(_describe_user(u) for u in report.users) or "-"))
    report.lines.append(f"  mode: {MODE_TEXT[server.mode]}")
    await _check_libraries(report, client)


async def _check_libraries(report: ServerReport, client: JellyfinClient) -> None:
    """Say which libraries of the server sync; a filter that leaves nothing in is a problem."""
    server = report.config
    rule = server.libraries
    if rule is None:
        report.lines.append("  libraries: all (no filter)")
        return
    try:
        libraries = await client.libraries()
    except ServerError as err:
        report.problems.append(f"{server.name}: cannot list its libraries: {_text(err)}")
        return
    scope = scope_of(server.name, rule, libraries)
    synced = ", ".join(lib.name for lib in scope.included) or "none"
    left_out = ", ".join(lib.name for lib in scope.excluded) or "none"
    report.lines.append(f"  libraries: syncing {synced}; left out: {left_out}")
    if scope.unknown:
        has = ", ".join(lib.name for lib in (*scope.included, *scope.excluded)) or "none"
        report.lines.append(
            f"  warning: {report.key}.libraries names {', '.join(scope.unknown)}, which this "
            f"server does not have (it has {has}); check the spelling"
        )
    if not scope.included:
        report.problems.append(
            f"{server.name}: {report.key}.libraries leaves none of its libraries in, so nothing "
            "of it would sync; fix the names (the server's libraries are listed above)"
        )


async def _report_users(
    config: Config, reports: list[ServerReport], match: UserMatch, out: TextIO
) -> list[str]:
    """Print how users map and where their tokens come from; return the problems."""
    problems = [f"users: {p}" for p in match.problems]
    by_name = {r.config.name: r for r in reports}
    print("Users:", file=out)
    for user in match.users:
        parts: list[str] = []
        for server, account in user.accounts.items():
            source, problem = await _token_source(by_name[server], account)
            parts.append(f"{server}: {account.name} [{source}]")
            if problem:
                problems.append(problem)
        print(f"  {user.display_name}: " + ", ".join(parts), file=out)
    if not match.users:
        print("  (none)", file=out)
        problems.append(
            "no user exists on two servers; nothing would sync (check names or users.map)"
        )
    for label, groups in (
        ("only here, not synced", match.unmatched),
        ("excluded", match.excluded),
        ("disabled, skipped", match.disabled),
    ):
        for server, names in groups.items():
            print(f"  {server}, {label}: {', '.join(names)}", file=out)
    for report in reports:
        known = {u.name.casefold() for u in report.users or ()}
        for name in report.config.users:
            if report.users is not None and name.casefold() not in known:
                print(
                    f"  {report.config.name}: {report.key}.users.{name} names no user there",
                    file=out,
                )
    return problems


async def _token_source(report: ServerReport, account: UserDto) -> tuple[str, str | None]:
    """Say how a user's token would be had on a server, and the problem if it cannot."""
    name = report.config.name
    key = f"{report.key}.users.{account.name}"
    cred = next(
        (c for n, c in report.config.users.items() if n.casefold() == account.name.casefold()),
        None,
    )
    if cred is not None and cred.token is not None:
        assert report.client is not None
        try:
            owner = await report.client.current_user(cred.token.get_secret_value())
        except HttpStatusError as err:
            return (
                "configured token",
                f"{name}: the token in {key}.token was rejected ({err.status})",
            )
        except ServerError as err:
            return "configured token", f"{name}: {_text(err)}"
        if owner.id != account.id:
            return "configured token", f"{name}: {key}.token belongs to {owner.name}"
        return "configured token, valid", None
    if cred is not None and cred.password is not None:
        # Not tried: a login on the user's device id would revoke the token jfsync run holds.
        return "configured password", None
    if report.quick_connect and report.key_is_admin:
        return "Quick Connect", None
    why = "Quick Connect is disabled" if not report.quick_connect else "the key is not an admin's"
    return "no token", (
        f"{name}: no way to get a token for user {account.name}: {why}; enable Quick Connect "
        f"or set {key}.token or {key}.password"
    )


def _describe_user(user: UserDto) -> str:
    flags = [f for f, on in (("admin", user.is_admin), ("disabled", user.is_disabled)) if on]
    return user.name + (f" ({', '.join(flags)})" if flags else "")


def _text(err: ServerError) -> str:
    """The message without the ``[server]`` prefix (the report line names the server)."""
    return str(err).removeprefix(f"[{err.server}] ")
