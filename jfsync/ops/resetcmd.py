"""``jfsync accept-reset``: resolve what the reset guard holds (see :mod:`jfsync.sync.resetguard`).

With ``sync.reset_guard: hold``, a server that showed a user's data wiped is held: nothing is
synced from or to it for that user. ``jfsync accept-reset SERVER [--user U]`` decides:

* by default, *accept*: the server's state is the user's; the next catch-up of that user on
  that server propagates it (the items it lost are reset on every server);
* with ``--restore``: the other servers' state is written back to the server (as the
  ``restore`` mode does), whatever the thresholds say.

Without ``--user`` every hold of SERVER is decided. It works whether ``jfsync run`` is
running or not. The ledger has one writer (docs/design-notes.md), so the command first tries
to open it: if it can, ``jfsync run`` is stopped and the decision is stored in the ledger,
applied when the user's socket next connects; if another process holds it, the decision goes
to the running service over the status endpoint (``POST /reset-holds/accept``, with the status
token), which applies it at once. Exit status: 0 decided, 1 nothing was held there, 2 invalid
arguments or config, 3 the running service's status endpoint could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from jfsync.config import Config, load_config_or_report
from jfsync.ops.statuscmd import DEFAULT_TIMEOUT_S, TOKEN_ENV, endpoint_url
from jfsync.sync.ledger import Ledger, LedgerInUseError, ResetHold
from jfsync.sync.merge import MergePolicy
from jfsync.sync.resetguard import describe_hold

EXIT_NOTHING_HELD = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
PROG = "jfsync accept-reset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the accept-reset command's arguments."""
    parser.add_argument("server", help="the config name of the server held by the reset guard")
    parser.add_argument(
        "--user", "-u", help="only this user (name on that server); default: every held user"
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="write the other servers' state back to SERVER instead of taking SERVER's state",
    )
    parser.add_argument("--config", "-c", required=True, help="path to the YAML config")
    parser.add_argument("--url", help="status endpoint of a running jfsync (default from config)")
    parser.add_argument(
        "--token", help=f"status bearer token (default: ${TOKEN_ENV}, then status.token)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for a running jfsync"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``jfsync accept-reset`` with parsed arguments; return the exit status."""
    out = sys.stdout
    config = load_config_or_report(args.config)
    if config is None:
        return EXIT_USAGE
    names = [s.name for s in config.servers]
    if args.server not in names:
        print(
            f"{PROG}: no server {args.server!r} in {args.config}; expected one of "
            f"{', '.join(names)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    user: str | None = args.user
    if user is not None and not user.strip():
        print(
            f"{PROG}: --user is empty; give the user's name, or leave --user out to decide "
            f"every hold on {args.server}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return accept_reset(
        config,
        args.server,
        user,
        restore=args.restore,
        url=args.url,
        token=args.token or os.environ.get(TOKEN_ENV),
        timeout_s=args.timeout or DEFAULT_TIMEOUT_S,
        out=out,
    )


def accept_reset(
    config: Config,
    server: str,
    user: str | None,
    *,
    restore: bool,
    url: str | None = None,
    token: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    out: TextIO,
) -> int:
    """Decide the holds of ``server``: in the ledger when free, else through ``jfsync run``."""
    holds = asyncio.run(_decide_offline(config, server, user, restore))
    verb = "restore" if restore else "accept"
    if holds is not None:
        if not holds:
            print(_nothing_held(server, user), file=out)
            return EXIT_NOTHING_HELD
        for hold in holds:
            print(describe_hold(hold), file=out)
        print(
            f"jfsync is not running: decided ({verb}); applied when `jfsync run` next catches "
            f"up these users on {server}",
            file=out,
        )
        return 0
    if token is None and config.status.token is not None:
        token = config.status.token.get_secret_value()
    base = url or endpoint_url(config)
    status, answer = _post(
        base, {"server": server, "user": user, "restore": restore}, token, timeout_s
    )
    if status is None or status in (401, 503):
        print(f"{PROG}: the ledger is in use by `jfsync run`, and {answer}", file=out)
        return EXIT_UNREACHABLE
    if status == 404:
        print(_nothing_held(server, user), file=out)
        return EXIT_NOTHING_HELD
    if status != 200 or not isinstance(answer, dict):
        print(f"{PROG}: {base} answered HTTP {status}: {_error_of(answer)}", file=out)
        return EXIT_USAGE if status == 400 else EXIT_UNREACHABLE
    for line in answer.get("applied", []):
        print(f"{line}; applied now by the running jfsync", file=out)
    for line in answer.get("pending", []):
        print(f"{line}; applied when that user's socket reconnects", file=out)
    return 0


async def _decide_offline(
    config: Config, server: str, user: str | None, restore: bool
) -> list[ResetHold] | None:
    """Store the decision in the ledger; None when a running jfsync holds the ledger."""
    if not config.ledger.exists():
        return []
    ledger = Ledger(config.ledger, MergePolicy.from_config(config))
    try:
        await ledger.open()
    except LedgerInUseError:
        return None
    try:
        return await ledger.resolve_reset_holds(server, user, "restore" if restore else "accept")
    finally:
        await ledger.close()


def _post(
    base: str, body: dict[str, Any], token: str | None, timeout_s: float
) -> tuple[int | None, Any]:
    """POST ``body`` to the running service; (status, JSON answer) or (None, why not)."""
    full = base.rstrip("/") + "/reset-holds/accept"
    if not full.startswith(("http://", "https://")):
        return None, f"{base} is not an http:// or https:// URL"
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        full,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), _json(response.read())
    except urllib.error.HTTPError as err:
        data = _json(err.read())
        err.close()
        if err.code == 401:
            hint = "wrong token" if token else f"pass --token or set {TOKEN_ENV}"
            return 401, f"its status endpoint {full} refused the request (401: {hint})"
        return int(err.code), data
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return None, f"its status endpoint cannot be reached ({full}: {reason}); pass --url"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return raw.decode("utf-8", "replace")[:200]


def _error_of(answer: Any) -> str:
    if isinstance(answer, dict):
        return str(answer.get("error") or answer)
    return str(answer)


def _nothing_held(server: str, user: str | None) -> str:
    who = f" for user {user}" if user else ""
    return f"{PROG}: nothing is held on {server}{who}; nothing to do (see `jfsync status`)"
