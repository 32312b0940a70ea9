"""``jfsync status``: a readable, scriptable view of a running jfsync's status endpoint.

It fetches ``/status`` and prints the problems first (paused peers, dead rows, servers that
cannot be reached, sockets that are not connected, peers that are down), then tables of
servers, sockets and peers. Exit status, for scripts:

* 0: nothing needs doing (warnings such as a server being down may be listed: jfsync queues
  and catches up by itself; ``--strict`` makes them fail too);
* 1: a peer is paused or has dead rows, or a user is held by the reset guard (someone must
  act), or with ``--strict`` any warning;
* 3: the endpoint cannot be reached, refused the token, or answered something else.

``--activity`` prints the activity feed (the recent changes received and written, newest
first) instead of the tables. ``--healthz`` asks ``/healthz`` instead and exits 0 (healthy)
or 1 (anything else), as a container ``HEALTHCHECK`` expects. The URL and token come from
``--url`` / ``--token``, else ``JFSYNC_STATUS_TOKEN``, else the ``status`` section of
``--config``, else ``http://127.0.0.1:8097`` without a token. The token is never printed.

``jfsync retry-dead`` lives here too (:func:`run_retry_dead`): it revives dead rows in the
ledger file, or through ``POST /retry-dead`` of the running jfsync that holds the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from jfsync.config import DEFAULT_STATUS_LISTEN, Config, load_config_or_report

#: Exit status: a peer is paused or has dead rows (or, with --strict, any warning).
EXIT_PROBLEMS = 1
#: Exit status: the config given with --config is not valid.
EXIT_CONFIG = 2
#: Exit status: the endpoint cannot be reached or refused the request.
EXIT_UNREACHABLE = 3
#: Environment variable read for the token when --token is not given.
TOKEN_ENV = "JFSYNC_STATUS_TOKEN"  # noqa: S105 - a variable name, not a secret
#: How long one request to the endpoint may take.
DEFAULT_TIMEOUT_S = 10.0
#: Dead rows listed per peer before "and N more".
DEAD_ROWS_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Problem:
    """One line of the problems section; ``blocking`` ones make the exit status non-zero."""

    blocking: bool
    text: str


class EndpointError(Exception):
    """The status endpoint could not be reached or did not answer as expected."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the status command's options."""
    parser.add_argument("--url", help="base URL of the status endpoint (default from --config)")
    parser.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}, then status.token of --config)"
    )
    parser.add_argument("--config", "-c", help="read the URL and token from this jfsync config")
    parser.add_argument("--json", action="store_true", help="print the raw /status JSON")
    parser.add_argument(
        "--healthz", action="store_true", help="only ask /healthz; exit 0 healthy, 1 otherwise"
    )
    parser.add_argument(
        "--activity",
        action="store_true",
        help="print the recent changes jfsync received and wrote (newest first)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 on warnings too (server down, socket lost)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``jfsync status`` with parsed arguments; return the exit status."""
    config: Config | None = None
    if args.config:
        config = load_config_or_report(args.config)
        if config is None:
            return EXIT_PROBLEMS if args.healthz else EXIT_CONFIG
    url = args.url or endpoint_url(config)
    token = args.token or os.environ.get(TOKEN_ENV) or _config_token(config)
    if args.healthz:
        return check_health(url, token, timeout_s=args.timeout, out=sys.stdout)
    return show_status(
        url,
        token,
        timeout_s=args.timeout,
        strict=args.strict,
        raw=args.json,
        activity=args.activity,
        out=sys.stdout,
    )


def endpoint_url(config: Config | None) -> str:
    """The URL to reach the endpoint a config describes (a wildcard bind means loopback)."""
    listen = config.status.listen if config is not None else DEFAULT_STATUS_LISTEN
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def show_status(
    url: str,
    token: str | None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    strict: bool = False,
    raw: bool = False,
    activity: bool = False,
    out: TextIO,
) -> int:
    """Fetch ``/status`` from ``url``, print it, and return the exit status.

    With ``activity`` only the activity feed is printed (``raw``: as JSON); the exit status
    still says whether something needs doing.
    """
    try:
        status, body = fetch(url, "/status", token, timeout_s)
        if status != 200:
            raise EndpointError(f"{url}/status answered HTTP {status}: {_error_of(body)}")
        snapshot = json.loads(body)
        if not isinstance(snapshot, dict):
            raise EndpointError(f"{url}/status did not answer a JSON object")
    except (EndpointError, ValueError) as err:
        print(f"jfsync status: {_hide(str(err), token)}", file=out)
        return EXIT_UNREACHABLE
    if activity:
        entries = snapshot.get("activity") or []
        if raw:
            print(json.dumps(entries, indent=2), file=out)
        else:
            print(_hide(render_activity(snapshot), token), file=out, end="")
        problems = find_problems(snapshot)
    elif raw:
        print(json.dumps(snapshot, indent=2), file=out)
        problems = find_problems(snapshot)
    else:
        text, problems = render(snapshot, url)
        print(_hide(text, token), file=out, end="")
    if any(p.blocking for p in problems) or (strict and problems):
        return EXIT_PROBLEMS
    return 0


def check_health(
    url: str, token: str | None, *, timeout_s: float = DEFAULT_TIMEOUT_S, out: TextIO
) -> int:
    """Ask ``/healthz``; print one line and return 0 when healthy, else 1."""
    try:
        status, body = fetch(url, "/healthz", token, timeout_s)
    except EndpointError as err:
        print(f"unhealthy: {_hide(str(err), token)}", file=out)
        return 1
    if status == 200:
        print("healthy", file=out)
        return 0
    print(f"unhealthy: HTTP {status}: {_hide(_error_of(body), token)}", file=out)
    return 1


def fetch(
    url: str, path: str, token: str | None, timeout_s: float, *, method: str = "GET"
) -> tuple[int, str]:
    """Ask ``url + path`` (GET, or ``method``); return (HTTP status, body).

    Raise EndpointError when unreachable or when the token is refused.
    """
    full = url.rstrip("/") + path
    if not full.startswith(("http://", "https://")):
        raise EndpointError(f"{url} is not an http:// or https:// URL")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        full,
        headers={"Accept": "application/json"},
        method=method,
        data=b"" if method == "POST" else None,
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        err.close()
        if err.code == 401:
            hint = "wrong token" if token else f"pass --token or set {TOKEN_ENV}"
            raise EndpointError(f"{full} refused the request (401: {hint})") from None
        return int(err.code), body
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise EndpointError(f"cannot reach {full}: {reason}") from None


def find_problems(snap: Mapping[str, Any]) -> list[Problem]:
    """List what needs attention, blocking problems (paused, dead rows) first."""
    blocking: list[Problem] = []
    warnings: list[Problem] = []
    now_ms = snap.get("now_ms")
    for server in snap.get("servers", []):
        name = server["name"]
        outbox = server["outbox"]
        if outbox.get("pause_reason"):
            blocking.append(Problem(True, f"peer {name} is paused: {outbox['pause_reason']}"))
        dead = outbox.get("dead") or []
        dead_count = outbox.get("dead_count", len(dead))
        if dead_count:
            lines = [f"peer {name} has {dead_count} dead row(s) (writes parked; not retried):"]
            for row in dead[:DEAD_ROWS_SHOWN]:
                what = row.get("name") or row["item"]
                lines.append(f"    {row['user']} / {what}: {row['reason'] or '?'}")
            if dead_count > DEAD_ROWS_SHOWN:
                lines.append(f"    … and {dead_count - DEAD_ROWS_SHOWN} more (see --json)")
            blocking.append(Problem(True, "\n".join(lines)))
        if not server.get("reachable") and outbox.get("down_since_ms") is None:
            # Never reached since start (a server found down later is said so just below).
            why = server.get("last_error") or "not reached yet"
            warnings.append(Problem(False, f"server {name} is not reachable: {why}"))
        if outbox.get("down_since_ms") is not None:
            since = _age(now_ms, outbox["down_since_ms"])
            warnings.append(
                Problem(
                    False,
                    f"peer {name} is down for writes{since}; {outbox['depth']} write(s) queued: "
                    f"{outbox.get('last_error') or '?'}",
                )
            )
        for user in server.get("users", []):
            if user["state"] != "connected":
                why = user.get("pause_reason") or user.get("last_error")
                suffix = f": {why}" if why else ""
                warnings.append(
                    Problem(
                        False,
                        f"socket {name}/{user['user']} not connected ({user['state']}){suffix}",
                    )
                )
    reset_blocking, reset_warnings = _reset_problems(snap)
    blocking += reset_blocking
    warnings += reset_warnings
    config = snap.get("config") or {}
    if config.get("last_error"):
        warnings.append(
            Problem(
                False,
                f"the last edit of {config.get('path', 'the config file')} was refused; the "
                f"running config stays: {config['last_error']}",
            )
        )
    if config.get("pending_restart"):
        waiting = ", ".join(config["pending_restart"])
        warnings.append(
            Problem(False, f"changed in the config file, applied at restart: {waiting}")
        )
    for pair in snap.get("identity", {}).get("pairs", []):
        if pair.get("ambiguous"):
            servers = " and ".join(pair["servers"])
            warnings.append(
                Problem(
                    False,
                    f"{pair['ambiguous']} item(s) match ambiguously between {servers} (not synced)",
                )
            )
    return blocking + warnings


def _reset_problems(snap: Mapping[str, Any]) -> tuple[list[Problem], list[Problem]]:
    """Reset holds (blocking: someone must decide) and restores done (warnings)."""
    guard = snap.get("reset_guard") or {}
    blocking: list[Problem] = []
    warnings: list[Problem] = []
    for hold in guard.get("holds", []):
        server, user = hold["server"], hold["user"]
        wiped = f"{hold['items']} of {hold['known']} items read as never touched"
        if hold.get("resolution"):
            warnings.append(
                Problem(
                    False,
                    f"user {user} on {server}: reset hold resolved ({hold['resolution']}); "
                    "applied at the next catch-up of that user there",
                )
            )
            continue
        blocking.append(
            Problem(
                True,
                f"user {user} on {server} is HELD by the reset guard ({wiped}: {server} lost "
                f"the user's data?); nothing syncs from or to {server} for {user} until "
                f"`jfsync accept-reset {server} --user {user}` (take {server}'s state) or "
                "with --restore (write the other servers' state back)",
            )
        )
    for trigger in guard.get("triggers", []):
        if trigger["action"] != "restored":
            continue
        warnings.append(
            Problem(
                False,
                f"{trigger['server']} lost user {trigger['user']}'s data ({trigger['items']} of "
                f"{trigger['known']} items read as never touched); not propagated, restored "
                "from the other servers "
                f"({_duration_since(snap.get('now_ms'), trigger['at_ms'])} ago)",
            )
        )
    return blocking, warnings


def render(snap: Mapping[str, Any], url: str = "") -> tuple[str, list[Problem]]:
    """Return the readable text for a snapshot and the problems it lists."""
    now_ms = snap.get("now_ms")
    problems = find_problems(snap)
    lines = [f"jfsync {snap.get('version', '?')} at {url}, up {_duration(snap.get('uptime_s'))}"]
    lines.append("")
    if problems:
        lines.append("PROBLEMS")
        for problem in problems:
            mark = "ERROR" if problem.blocking else "WARN "
            lines.append(f"  {mark} {problem.text}")
    else:
        lines.append("No problems.")
    servers = snap.get("servers", [])
    lines += ["", "SERVERS"]
    lines += _table(
        ["NAME", "REACHABLE", "VERSION", "SERVER ID", "LAST ERROR"],
        [
            [
                s["name"],
                "yes" if s["reachable"] else "no",
                s.get("version") or "-",
                s.get("server_id") or "-",
                s.get("last_error") or "-",
            ]
            for s in servers
        ],
    )
    lines += ["", "SOCKETS"]
    lines += _table(
        ["SERVER", "USER", "STATE", "CONNECTED FOR", "LAST EVENT", "RECONNECTS"],
        [
            [
                s["name"],
                u["user"],
                u["state"],
                _duration_since(now_ms, u.get("connected_since_ms")),
                "-" if u.get("last_event_age_s") is None else _duration(u["last_event_age_s"]),
                str(u["reconnects"]),
            ]
            for s in servers
            for u in s.get("users", [])
        ],
    )
    lines += ["", "PEERS (writes owed to each server)"]
    lines += _table(
        ["PEER", "STATE", "QUEUED", "OLDEST", "IN FLIGHT", "DONE", "SKIPPED", "FAILED", "DEAD"],
        [
            [
                s["name"],
                _peer_state(s["outbox"]),
                str(s["outbox"]["depth"]),
                "-"
                if s["outbox"].get("oldest_age_s") is None
                else _duration(s["outbox"]["oldest_age_s"]),
                str(s["outbox"]["in_flight"]),
                str(s["outbox"]["writes_done"]),
                str(s["outbox"]["writes_skipped"]),
                str(s["outbox"]["failures"]),
                str(s["outbox"].get("dead_count", len(s["outbox"]["dead"]))),
            ]
            for s in servers
        ],
    )
    pairs = snap.get("identity", {}).get("pairs", [])
    if pairs:
        lines += ["", "ITEM MATCHING"]
        lines += _table(
            ["SERVERS", "MATCHED", "UNMATCHED", "AMBIGUOUS"],
            [[" ⇄ ".join(p["servers"])] + [_count(p.get(k)) for k in _MATCH_KEYS] for p in pairs],
        )
    ledger = snap.get("ledger", {})
    reconcile = snap.get("reconcile", {})
    lines.append("")
    lines.append(f"Ledger: {ledger.get('path', '?')} ({_bytes(ledger.get('size_bytes'))})")
    if ledger.get("index_path"):
        lines.append(
            f"Library index: {ledger['index_path']} ({_bytes(ledger.get('index_size_bytes'))})"
        )
    if reconcile.get("last_at_ms") is None:
        lines.append("Last full reconcile: not yet")
    else:
        ago = _duration_since(now_ms, reconcile["last_at_ms"])
        lines.append(f"Last full reconcile: {ago} ago: {reconcile.get('last_result') or '-'}")
    return "\n".join(lines) + "\n", problems


_MATCH_KEYS = ("matched", "unmatched", "ambiguous")


def render_activity(snap: Mapping[str, Any]) -> str:
    """The activity feed as a table, newest first: when, who, what, where, how long."""
    now_ms = snap.get("now_ms")
    entries = snap.get("activity")
    if entries is None:
        return "This jfsync does not report activity (older version).\n"
    if not entries:
        return "No activity yet: nothing changed since jfsync started.\n"
    rows = []
    for entry in entries:
        targets = entry.get("to") or []
        route = f"{entry.get('from') or '?'} → " + (
            ", ".join(str(t["server"]) for t in targets) or "(none)"
        )
        rows.append(
            [
                f"{_duration_since(now_ms, entry.get('at_ms'))} ago",
                str(entry.get("user_name") or entry.get("user")),
                str(entry.get("name") or entry.get("item")),
                route,
                ", ".join(entry.get("registers") or []) or "-",
                "; ".join(_delivery_text(t) for t in targets) or "-",
            ]
        )
    lines = [f"ACTIVITY (newest first, {len(entries)} shown)"]
    lines += _table(["WHEN", "USER", "ITEM", "FROM → TO", "CHANGED", "DELIVERY"], rows)
    return "\n".join(lines) + "\n"


def _delivery_text(target: Mapping[str, Any]) -> str:
    state = target.get("state")
    if state == "written" and target.get("latency_s") is not None:
        return f"{target['server']} {_latency(float(target['latency_s']))}"
    return f"{target['server']} {state or '?'}"


def _latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else _duration(seconds)


def _peer_state(outbox: Mapping[str, Any]) -> str:
    if outbox.get("pause_reason"):
        return "PAUSED"
    if outbox.get("down_since_ms") is not None:
        return "down"
    if outbox.get("in_flight") or outbox.get("depth"):
        return "sending"
    return "ok"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = int(max(0.0, seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _duration_since(now_ms: int | None, then_ms: int | None) -> str:
    if now_ms is None or then_ms is None:
        return "-"
    return _duration((now_ms - then_ms) / 1000)


def _age(now_ms: int | None, then_ms: int) -> str:
    if now_ms is None:
        return ""
    return f" for {_duration((now_ms - then_ms) / 1000)}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _bytes(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _error_of(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(data, dict):
        return str(data.get("error") or data.get("reason") or data.get("status") or data)
    return str(data)[:200]


def _config_token(config: Config | None) -> str | None:
    if config is None or config.status.token is None:
        return None
    return config.status.token.get_secret_value()


def _hide(text: str, token: str | None) -> str:
    """Never echo the token, whatever the endpoint answered."""
    return text.replace(token, "***") if token and len(token) >= 4 else text


# ---------------------------------------------------------------------- jfsync retry-dead

#: ``jfsync retry-dead`` exit status: the ledger could not be used, or jfsync failed to revive.
EXIT_RETRY_FAILED = 1


def add_retry_dead_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``retry-dead`` command's options."""
    parser.add_argument(
        "--config", "-c", help="the jfsync config: its ledger, servers and status endpoint"
    )
    parser.add_argument(
        "--server", metavar="NAME", help="only the dead rows owed to this server (default: all)"
    )
    parser.add_argument(
        "--url",
        help="ask this status endpoint (default: open the ledger of --config, or ask the "
        "endpoint of --config when a running jfsync holds the ledger)",
    )
    parser.add_argument(
        "--token", help=f"bearer token (default: ${TOKEN_ENV}, then status.token of --config)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request"
    )


def run_retry_dead(args: argparse.Namespace) -> int:
    """Run ``jfsync retry-dead``; return the exit status.

    Without ``--url`` the ledger of ``--config`` is opened directly; when a running
    ``jfsync run`` holds it (the single-writer lock), the request goes to that process's
    status endpoint instead, which revives the rows and wakes the pushers at once.
    Exit status: 0 revived (counts printed, zero included), 1 the ledger could not be used
    or the service failed to revive, 2 invalid config or arguments, 3 the endpoint could not
    be reached, refused the token or answered something else.
    """
    if not args.config and not args.url:
        print(
            "jfsync retry-dead: give --config FILE (or --url of a running jfsync's status "
            "endpoint)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    config: Config | None = None
    if args.config:
        config = load_config_or_report(args.config)
        if config is None:
            return EXIT_CONFIG
        names = [s.name for s in config.servers]
        if args.server is not None and args.server not in names:
            print(
                f"jfsync retry-dead: --server {args.server}: no such server in {args.config}; "
                f"expected one of {', '.join(names)}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    token = args.token or os.environ.get(TOKEN_ENV) or _config_token(config)
    url = args.url
    if url is None:
        assert config is not None
        from jfsync.errors import JfsyncError
        from jfsync.sync.ledger import LedgerInUseError

        path = str(config.ledger)
        if path == ":memory:" or not os.path.exists(path):
            print(
                f"jfsync retry-dead: there is no ledger at {path} (nothing to revive); "
                "check ledger: in the config",
                file=sys.stderr,
            )
            return EXIT_RETRY_FAILED
        try:
            revived = asyncio.run(retry_dead_in_ledger(config, args.server))
        except LedgerInUseError:
            url = endpoint_url(config)
            print(
                f"jfsync retry-dead: a running jfsync holds the ledger; asking it at {url}",
                file=sys.stderr,
            )
        except JfsyncError as err:
            print(f"jfsync retry-dead: {err}", file=sys.stderr)
            return _ledger_exit(err)
        else:
            print_revived(revived, sys.stdout)
            return 0
    return retry_dead_via_endpoint(
        url, token, args.server, timeout_s=args.timeout, out=sys.stdout, err=sys.stderr
    )


async def retry_dead_in_ledger(config: Config, server: str | None = None) -> dict[str, int]:
    """Revive the dead rows of every server (or of ``server``) in the ledger file itself.

    Raises LedgerInUseError when a running jfsync holds the ledger. The caller checks that
    the file exists (an empty ledger would be created).
    """
    from jfsync.sync.ledger import Ledger
    from jfsync.sync.merge import MergePolicy

    path = str(config.ledger)
    names = [server] if server else [s.name for s in config.servers]
    policy = MergePolicy.from_config(config)
    async with Ledger(path, policy, user_map=config.users.map) as ledger:
        return {name: await ledger.retry_dead(name) for name in names}


def retry_dead_via_endpoint(
    url: str,
    token: str | None,
    server: str | None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    out: TextIO,
    err: TextIO,
) -> int:
    """``POST /retry-dead`` to a running jfsync; print one line per server; the exit status."""
    path = "/retry-dead" + (f"?{urllib.parse.urlencode({'server': server})}" if server else "")
    try:
        status, body = fetch(url, path, token, timeout_s, method="POST")
    except EndpointError as error:
        print(f"jfsync retry-dead: {_hide(str(error), token)}", file=err)
        return EXIT_UNREACHABLE
    if status == 200:
        try:
            revived = json.loads(body)["revived"]
            counts = {str(name): int(count) for name, count in revived.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            print(f"jfsync retry-dead: {url}/retry-dead answered an unexpected body", file=err)
            return EXIT_UNREACHABLE
        print_revived(counts, out)
        return 0
    reason = _hide(_error_of(body), token)
    print(f"jfsync retry-dead: {url}/retry-dead answered HTTP {status}: {reason}", file=err)
    if status == 400:
        return EXIT_CONFIG
    if status == 503:
        return EXIT_RETRY_FAILED
    return EXIT_UNREACHABLE


def print_revived(revived: Mapping[str, int], out: TextIO) -> None:
    """One line per server: how many of its dead rows are live again."""
    for name, count in revived.items():
        print(f"{name}: {count} dead row{'' if count == 1 else 's'} revived", file=out)


def _ledger_exit(error: Exception) -> int:
    """A ledger file that is not a ledger is a configuration problem (2); else 1."""
    from jfsync.sync.ledger import LedgerFileError

    return EXIT_CONFIG if isinstance(error, LedgerFileError) else EXIT_RETRY_FAILED
