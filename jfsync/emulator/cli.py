"""``jfsync emulator``: run one emulated Jellyfin server in the foreground until SIGINT/SIGTERM.

Prints one line saying where it listens and which users exist (never passwords or keys), then
serves until told to stop, and exits 0. With ``--state FILE`` the server starts from the
library and user data saved in FILE (when it exists) and saves them there when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from jfsync.emulator.persist import StateFileError
from jfsync.emulator.server import Emulator
from jfsync.emulator.state import SUPPORTED_VERSIONS


def _user(value: str) -> tuple[str, str]:
    name, sep, password = value.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {value!r}")
    return name, password if sep else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8096, help="port (0 picks a free one)")
    parser.add_argument("--api-key", default="KEY", help="the administrator API key")
    parser.add_argument(
        "--user",
        action="append",
        type=_user,
        dest="users",
        metavar="NAME:PASSWORD",
        help="a user (repeat; the first is an administrator); default alice and bob",
    )
    parser.add_argument(
        "--library-size", type=int, default=2000, help="number of movies and episodes"
    )
    parser.add_argument("--seed", type=int, default=1, help="library generator seed")
    parser.add_argument(
        "--server-version",
        default="10.10.7",
        choices=SUPPORTED_VERSIONS,
        help="the Jellyfin version to behave like",
    )
    parser.add_argument("--path-root", default="/media", help="root of the media paths")
    parser.add_argument(
        "--no-provider-ids", action="store_true", help="generate items without provider ids"
    )
    parser.add_argument("--server-name", default="emulator", help="the server's name")
    parser.add_argument(
        "--debounce", type=float, default=0.5, help="UserDataChanged debounce in seconds"
    )
    parser.add_argument(
        "--no-quick-connect", action="store_true", help="start with Quick Connect disabled"
    )
    parser.add_argument(
        "--state",
        metavar="FILE",
        help="load the library and user data from FILE if it exists, and save them there on "
        "exit (and on POST /__emulator__/save-state); without it every start is fresh",
    )


def run(args: argparse.Namespace) -> int:
    """Run the emulator until SIGINT or SIGTERM; return the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        asyncio.run(_serve(args))
    except StateFileError as err:
        print(f"jfsync emulator: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"jfsync emulator: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    return 0


async def _serve(args: argparse.Namespace) -> None:
    emu = Emulator(
        api_key=args.api_key,
        users=args.users or [("alice", "secret"), ("bob", "secret")],
        library_size=args.library_size,
        seed=args.seed,
        server_version=args.server_version,
        path_root=args.path_root,
        provider_ids=not args.no_provider_ids,
        debounce_s=args.debounce,
        host=args.host,
        port=args.port,
        server_name=args.server_name,
        quick_connect=not args.no_quick_connect,
        state_file=args.state,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await emu.start()
    try:
        users = ", ".join(
            f"{u.name}{' (admin)' if u.is_admin else ''} id={u.id}" for u in emu.users.values()
        )
        print(
            f"jfsync emulator: Jellyfin {emu.version} '{emu.server_name}' "
            f"(id {emu.server_id}) listening on {emu.url} with {len(emu.library)} items; "
            f"users: {users}",
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await emu.close()
        if args.state:
            emu.save_state()
            print(f"jfsync emulator: state saved to {args.state}", flush=True)
