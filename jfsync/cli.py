"""The ``jfsync`` command line: argument parsing and dispatch to each subcommand.

Subcommands: ``init`` (write a first config, :mod:`jfsync.ops.initcmd`), ``check`` (validate
a config, then reach every server), ``emulator`` (run a Jellyfin emulator on loopback),
``reconcile`` (one full reconcile, or with ``--dry-run`` what it would change), ``retry-dead``
(revive parked writes), ``accept-reset`` (resolve a reset hold, :mod:`jfsync.ops.resetcmd`), and
the service commands as they exist. Every command returns an exit status; problems go to
stderr, one per line, and never include secrets. ``run`` applies edits of its config file
without a restart (on change or SIGHUP, :mod:`jfsync.reload`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jfsync import __version__
from jfsync.config import Config, load_config_or_report
from jfsync.errors import JfsyncError

Handler = Callable[[argparse.Namespace], int]

#: Exit status for a configuration that does not validate.
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the jfsync command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jfsync",
        description="Keep played, favourites, resume points and ratings in sync across "
        "Jellyfin servers.",
    )
    parser.add_argument("--version", action="version", version=f"jfsync {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="run the replicator until SIGINT or SIGTERM")
    run.add_argument("--config", "-c", required=True, help="path to the YAML config")
    run.set_defaults(handler=_run)

    init = sub.add_parser(
        "init",
        help="write a first config: asks for the servers, checks them, lists the users",
        description="Ask for (or take as --server/--api-key) each server's URL and admin API "
        "key, check them as `jfsync check` does, list the people it would sync and write a "
        "commented config file. Refuses to overwrite one without --force.",
    )
    from jfsync.ops import initcmd

    initcmd.add_arguments(init)
    init.set_defaults(handler=initcmd.run)

    check = sub.add_parser("check", help="validate the config and reach every server")
    check.add_argument("--config", "-c", required=True, help="path to the YAML config")
    check.add_argument(
        "--offline", action="store_true", help="only validate the file; do not contact servers"
    )
    check.set_defaults(handler=_check)

    status = sub.add_parser(
        "status", help="show a running jfsync's status endpoint, problems first (scriptable)"
    )
    from jfsync.ops import statuscmd

    statuscmd.add_arguments(status)
    status.set_defaults(handler=statuscmd.run)

    _add_retry_dead(sub)

    reconcile = sub.add_parser(
        "reconcile",
        help="compare every server once, repair what differs, and exit",
        description="Rescan every library, match items, read every user's data on every "
        "server, merge it (first-contact rules keep history found on only one side) and write "
        "what differs. With --dry-run nothing is written: not to any server, not to the "
        "ledger file (the run works on a copy of it).",
    )
    reconcile.add_argument("--config", "-c", required=True, help="path to the YAML config")
    reconcile.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would change per user and server, and write nothing",
    )
    reconcile.add_argument(
        "--sample", type=int, default=5, help="items shown per user and server (default 5)"
    )
    reconcile.set_defaults(handler=_reconcile)

    _add_accept_reset(sub)

    demo = sub.add_parser(
        "demo", help="two emulated servers, the replicator, and users acting on both sides"
    )
    from jfsync.ops import demo as demo_cmd

    demo_cmd.add_arguments(demo)
    demo.set_defaults(handler=demo_cmd.run)

    emulator = sub.add_parser("emulator", help="run a Jellyfin emulator on loopback")
    from jfsync.emulator import cli as emulator_cli

    emulator_cli.add_arguments(emulator)
    emulator.set_defaults(handler=emulator_cli.run)

    watch = sub.add_parser("watch", help="print every user's live events from the servers")
    from jfsync.ops import watch as watch_cmd

    watch_cmd.add_arguments(watch)
    watch.set_defaults(handler=watch_cmd.run)
    return parser


def _add_retry_dead(sub: Any) -> None:
    """``jfsync retry-dead``: make parked (dead) rows live again."""
    from jfsync.ops import statuscmd

    retry = sub.add_parser(
        "retry-dead",
        help="try dead (parked) writes again, for every server or one",
        description="Make the rows parked as dead (a server answered 400 or 404) live again, "
        "so they are tried at once. Works beside a running `jfsync run` (through its status "
        "endpoint) and without one (in the ledger file). Prints one line per server with "
        "the count. Exit status: 0 done, 1 the ledger could not be used, 2 invalid config "
        "or arguments, 3 the status endpoint could not be reached or refused the token.",
    )
    statuscmd.add_retry_dead_arguments(retry)
    retry.set_defaults(handler=statuscmd.run_retry_dead)


def _add_accept_reset(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``jfsync accept-reset``: resolve what the reset guard holds (jfsync.ops.resetcmd)."""
    from jfsync.ops import resetcmd

    accept = sub.add_parser(
        "accept-reset",
        help="resolve a reset hold: take the held server's state as the user's, or --restore",
        description="With sync.reset_guard: hold, a server that showed a user's data wiped is "
        "held (nothing synced from or to it for that user). Accept its state as the user's "
        "(propagated to every server), or with --restore write the other servers' state back "
        "to it. Works with `jfsync run` running (through its status endpoint) or stopped.",
    )
    resetcmd.add_arguments(accept)
    accept.set_defaults(handler=resetcmd.run)


def _run(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None or not _ledger_usable(config, "run"):
        return EXIT_CONFIG
    from jfsync.sync.ledger.file import check_ledger_file

    ledger = check_ledger_file(config.ledger)
    if not ledger.ok:
        for problem in ledger.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    import logging
    import sqlite3

    from jfsync.logs import configure_logging
    from jfsync.ops.runcmd import run_service, tune_garbage_collector

    configure_logging(config.logging.level, config.secret_values())
    for warning in ledger.warnings:
        logging.getLogger("jfsync.sync.ledger.file").warning("%s", warning)
    tune_garbage_collector()
    try:
        return asyncio.run(run_service(config, config_path=args.config))
    except sqlite3.Error as err:  # the file went bad between the check and the open
        print(
            f"{args.config}: ledger: {config.ledger} cannot be used ({err}); restore it from a "
            "backup, or move it away to start a new ledger",
            file=sys.stderr,
        )
        return EXIT_CONFIG


def _ledger_usable(config: Config, command: str) -> bool:
    """Refuse, with one line, an existing ledger file that is not a ledger (0 bytes, not
    SQLite): SQLite would take it for a new, empty ledger."""
    from jfsync.sync.ledger import LedgerFileError, check_ledger_file

    try:
        check_ledger_file(config.ledger)
    except LedgerFileError as err:
        print(f"jfsync {command}: {err}", file=sys.stderr)
        return False
    return True


def _check(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    from jfsync.sync.ledger.file import check_ledger_file

    ledger = check_ledger_file(config.ledger)
    for warning in ledger.warnings:
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    if not ledger.ok:
        for problem in ledger.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    names = ", ".join(s.name for s in config.servers)
    print(f"{args.config}: config is valid ({len(config.servers)} servers: {names})")
    if args.offline:
        return 0
    from jfsync.ops.check import run_online_check

    return run_online_check(config)


def _reconcile(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None or not _ledger_usable(config, "reconcile"):
        return EXIT_CONFIG
    from jfsync.logs import configure_logging
    from jfsync.ops.reconcilecmd import run_reconcile
    from jfsync.ops.runcmd import tune_garbage_collector

    # The report goes to stdout; progress logs only when asked for with logging.level: debug.
    level = config.logging.level if config.logging.level in ("debug",) else "warning"
    configure_logging(level, config.secret_values())
    # As for `jfsync run`: full collections walking a whole library's objects stalled the loop.
    tune_garbage_collector()
    try:
        outcome = asyncio.run(
            run_reconcile(config, dry_run=args.dry_run, out=sys.stdout, sample=max(0, args.sample))
        )
    except JfsyncError as err:  # e.g. the ledger is in use by `jfsync run`
        print(f"jfsync reconcile: {err}", file=sys.stderr)
        return 1
    return 0 if outcome.ok else 1
