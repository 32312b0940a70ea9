"""``jfsync init``: a guided first config, checked against the servers before it is written.

It asks for (or takes as ``--server NAME=URL`` and ``--api-key NAME=KEY`` flags) each server's URL,
administrator API key and name, builds the config, runs the same online check as ``jfsync
check`` (reachable, version, key valid and an administrator's, users and where their tokens
come from), reads each server's libraries, lists the people it would match (the matching of
:mod:`jfsync.sync.users`) and writes a commented YAML file. It refuses to overwrite an existing
file without ``--force`` and to write a config whose check failed without ``--no-check``. An API
key may be given as ``${ENV_VAR}`` (written as such, read from the environment for the check),
or ``--keys-as-env`` writes every key as a ``${JFSYNC_<NAME>_API_KEY}`` reference instead of the
key itself. A file holding a key is created readable by its owner only. Keys are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml

from jfsync.config import Config, load_config
from jfsync.errors import ConfigError, ServerError
from jfsync.jellyfin.api import JellyfinClient
from jfsync.jellyfin.wire import UserDto
from jfsync.ops.check import CHECK_DEVICE_ID, check_online
from jfsync.sync.users import UserMatch, match_users

#: Exit statuses: written; the check found problems; bad input or refused overwrite.
EXIT_OK = 0
EXIT_CHECK = 1
EXIT_USAGE = 2

_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class ServerAnswer:
    """One server as the user gave it: name, URL, and the key as typed (maybe ``${VAR}``)."""

    name: str
    url: str
    key: str
    #: What the file will hold for the key (the key, or a ``${VAR}`` reference).
    written_key: str = ""
    libraries: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jfsync init`` arguments."""
    parser.add_argument(
        "--output", "-o", default="jfsync.yaml", help="the config file to write (jfsync.yaml)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a server (repeat for each); without them init asks",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="the admin API key of server NAME; KEY may be ${ENV_VAR} (written as such)",
    )
    parser.add_argument(
        "--keys-as-env",
        action="store_true",
        help="write each key as ${JFSYNC_<NAME>_API_KEY} instead of the key itself",
    )
    parser.add_argument(
        "--ledger", default="./jfsync.db", help="where jfsync keeps its state (./jfsync.db)"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="write the file even if a server fails the check"
    )
    parser.add_argument(
        "--no-input", action="store_true", help="never ask; fail when something is missing"
    )


def run(args: argparse.Namespace) -> int:
    """The ``jfsync init`` command."""
    return asyncio.run(
        init_config(
            args,
            stdin=sys.stdin,
            out=sys.stdout,
            err=sys.stderr,
            environ=os.environ,
        )
    )


class _Prompter:
    """Questions on ``out``, answers from ``stdin`` (keys without echo on a terminal)."""

    def __init__(self, stdin: TextIO, out: TextIO) -> None:
        self.stdin = stdin
        self.out = out

    def ask(self, question: str, default: str | None = None) -> str:
        suffix = f" [{default}]" if default else ""
        self.out.write(f"{question}{suffix}: ")
        self.out.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError(question)
        answer = line.strip()
        return answer or (default or "")

    def ask_secret(self, question: str) -> str:
        if self.stdin is sys.stdin and sys.stdin.isatty():
            return getpass.getpass(f"{question}: ").strip()
        return self.ask(question)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {value.split('=')[0]!r}...: expected NAME=VALUE")
        if name in found:
            raise ValueError(f"{flag}: server {name!r} given twice")
        found[name] = rest
    return found


def _default_name(text: str | None, taken: set[str], index: int) -> str:
    base = _NAME_CHARS.sub("-", (text or "").strip()).strip("-.").lower()[:40]
    base = base if base and base[0].isalnum() else f"server{index}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


async def _public_name(session: aiohttp.ClientSession, url: str) -> str | None:
    """The ServerName a server announces (no key needed), for a default name."""
    try:
        client = JellyfinClient("new", url, "-", session=session, device_id=CHECK_DEVICE_ID)
        return (await client.public_info()).server_name
    except (ServerError, ValueError):
        return None


async def _collect(
    args: argparse.Namespace,
    prompter: _Prompter | None,
    session: aiohttp.ClientSession,
    err: TextIO,
) -> list[ServerAnswer] | None:
    """The servers from the flags, then from questions while fewer than two are known."""
    try:
        urls = _pairs(args.server, "--server")
        keys = _pairs(args.api_key, "--api-key")
    except ValueError as problem:
        print(f"jfsync init: {problem}", file=err)
        return None
    unknown = sorted(set(keys) - set(urls))
    if unknown:
        print(f"jfsync init: --api-key for {', '.join(unknown)}, given no --server", file=err)
        return None
    answers: list[ServerAnswer] = []
    for name, url in urls.items():
        key = keys.get(name)
        if key is None:
            if prompter is None:
                print(f"jfsync init: no --api-key {name}=KEY given", file=err)
                return None
            key = prompter.ask_secret(f"API key of {name} (Dashboard > API Keys, or ${{VAR}})")
        answers.append(ServerAnswer(name, url, key))
    if len(answers) >= 2:
        return answers
    if prompter is None:
        print("jfsync init: give at least two --server NAME=URL (and their --api-key)", file=err)
        return None
    while True:
        index = len(answers) + 1
        if index > 2:
            more = prompter.ask("Add another server? (y/N)", "n").lower()
            if not more.startswith("y"):
                return answers
        url = prompter.ask(f"Server {index} URL (e.g. http://jellyfin.lan:8096)")
        while not url:
            url = prompter.ask(f"Server {index} URL")
        key = prompter.ask_secret(f"Server {index} API key (Dashboard > API Keys, or ${{VAR}})")
        taken = {a.name for a in answers}
        default = _default_name(await _public_name(session, url), taken, index)
        name = prompter.ask(f"Server {index} name", default)
        answers.append(ServerAnswer(name, url, key))


def _resolve_keys(
    answers: list[ServerAnswer], keys_as_env: bool, environ: Mapping[str, str], err: TextIO
) -> bool:
    """Set what the file holds for each key; resolve ``${VAR}`` for the check."""
    ok = True
    for answer in answers:
        ref = _ENV_REF.match(answer.key)
        if ref is not None:
            answer.written_key = answer.key
            value = environ.get(ref.group(1))
            if not value:
                print(
                    f"jfsync init: {answer.name}: environment variable {ref.group(1)} is not "
                    "set; set it (the key is needed to check the server) and run init again",
                    file=err,
                )
                ok = False
                continue
            answer.key = value
        elif keys_as_env:
            answer.written_key = "${" + env_name(answer.name) + "}"
        else:
            answer.written_key = answer.key
    return ok


def env_name(server: str) -> str:
    """The environment variable ``--keys-as-env`` names for a server's key."""
    return "JFSYNC_" + re.sub(r"[^A-Z0-9]", "_", server.upper()) + "_API_KEY"


def _config_of(answers: list[ServerAnswer], ledger: str) -> dict[str, Any]:
    return {
        "ledger": ledger,
        "servers": [{"name": a.name, "url": a.url, "api_key": a.key} for a in answers],
    }


async def _libraries(config: Config, session: aiohttp.ClientSession) -> dict[str, list[str]]:
    """Each reachable server's library names (for the comments of the file)."""
    found: dict[str, list[str]] = {}
    for server in config.servers:
        client = JellyfinClient.for_server(server, session=session, device_id=CHECK_DEVICE_ID)
        try:
            found[server.name] = [lib.name for lib in await client.libraries()]
        except ServerError:
            found[server.name] = []
    return found


async def _match(config: Config, session: aiohttp.ClientSession) -> UserMatch:
    users: dict[str, list[UserDto]] = {}
    for server in config.servers:
        client = JellyfinClient.for_server(server, session=session, device_id=CHECK_DEVICE_ID)
        try:
            users[server.name] = await client.users()
        except ServerError:
            continue
    return match_users(config, users)


async def init_config(
    args: argparse.Namespace,
    *,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str],
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Ask, check, and write the config; return the exit status (see the module docstring)."""
    target = Path(args.output)
    if target.exists() and not args.force:  # noqa: ASYNC240 - one stat before anything
        print(
            f"jfsync init: {target} exists; not overwritten (give --force to replace it)",
            file=err,
        )
        return EXIT_USAGE
    prompter = None if args.no_input else _Prompter(stdin, out)
    async with aiohttp.ClientSession() as session:
        try:
            answers = await _collect(args, prompter, session, err)
        except EOFError as question:
            print(f"jfsync init: no answer to {str(question)!r} (input ended)", file=err)
            return EXIT_USAGE
        if answers is None or not _resolve_keys(answers, args.keys_as_env, environ, err):
            return EXIT_USAGE
        try:
            config = Config.model_validate(_config_of(answers, args.ledger))
        except ValueError:
            # Re-validate through the loader for one line per problem, keys hidden.
            from jfsync.config import parse_config

            try:
                parse_config(
                    _yaml(answers, {}, None, now(), ledger=args.ledger, plain=True),
                    source=str(target),
                )
            except ConfigError as problems:
                for problem in problems.problems:
                    print(f"jfsync init: {problem}", file=err)
            return EXIT_USAGE
        print("Checking the servers...", file=out)
        status = await check_online(config, out)
        if status != 0 and not args.no_check:
            print(
                f"jfsync init: {target} not written; fix the problems above and run init again "
                "(or give --no-check to write it anyway)",
                file=err,
            )
            return EXIT_CHECK
        libraries = await _libraries(config, session)
        match = await _match(config, session)
    text = _yaml(answers, libraries, match, now(), ledger=args.ledger)
    holds_key = any(not _ENV_REF.match(a.written_key) for a in answers)
    _write(target, text, private=holds_key)
    load_config(target, environ={**environ, **_env_for_check(answers)})  # it reads back
    print(f"Wrote {target}.", file=out)
    refs = sorted({a.written_key[2:-1] for a in answers if _ENV_REF.match(a.written_key)})
    if refs:
        keys = "API keys" if len(refs) > 1 else "API key"
        print(
            f"Before jfsync run, set {', '.join(refs)} to the {keys} in its environment.", file=out
        )
    print(f"Next: jfsync check -c {target}, then jfsync run -c {target}", file=out)
    return EXIT_OK


def _env_for_check(answers: list[ServerAnswer]) -> dict[str, str]:
    """Values for the ``${VAR}`` the file names, so reading it back can resolve them."""
    found: dict[str, str] = {}
    for answer in answers:
        ref = _ENV_REF.match(answer.written_key)
        if ref is not None:
            found[ref.group(1)] = answer.key
    return found


def _write(target: Path, text: str, *, private: bool) -> None:
    """Write ``text`` to ``target`` atomically (mode 0600 when it holds a key)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _quote(value: str) -> str:
    """A YAML scalar: plain when YAML reads it back as the same text, else double-quoted
    (a key of digits would otherwise be read as a number)."""
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml(
    answers: list[ServerAnswer],
    libraries: Mapping[str, list[str]],
    match: UserMatch | None,
    when: datetime,
    *,
    ledger: str = "./jfsync.db",
    plain: bool = False,
) -> str:
    """The commented config file."""
    buf = io.StringIO()

    def w(line: str = "") -> None:
        buf.write(line + "\n")

    w(f"# jfsync configuration, written by `jfsync init` on {when:%Y-%m-%d %H:%M} UTC.")
    w("# Check it with `jfsync check -c FILE`, run with `jfsync run -c FILE`.")
    w("# Edits are applied while jfsync runs (on save, or `kill -HUP`); an invalid edit is")
    w("# refused and the running config kept (see the log, or config.last_error on /status).")
    w()
    w("# Where jfsync keeps what each server holds and what each still needs (SQLite).")
    w(f"ledger: {_quote(ledger)}")
    w()
    w("servers:")
    w("  # name: unique, used in logs and status; url: as jfsync reaches it;")
    w("  # api_key: an administrator API key (Dashboard > API Keys), or ${ENV_VAR}.")
    w("  # mode: both (default) | send (jfsync never writes to it) | receive (its own")
    w("  #   changes are not sent to the others).")
    w("  # libraries: include: [names] (only these) or exclude: [names], by library name.")
    for answer in answers:
        key = answer.key if plain else answer.written_key
        w(f"  - name: {_quote(answer.name)}")
        w(f"    url: {_quote(answer.url)}")
        w(f"    api_key: {_quote(key)}")
        libs = libraries.get(answer.name)
        if libs:
            w(f"    # its libraries: {', '.join(libs)}")
            w("    # libraries:")
            w(f"    #   exclude: [{_quote(libs[-1])}]")
        w("    # mode: both")
    w()
    w("users:")
    w("  # Accounts are the same person when their names match (case-insensitive);")
    w("  # users.map pairs differently named accounts.")
    if match is not None:
        if match.users:
            w("  # jfsync init found these people:")
            for person in match.users:
                where = ", ".join(f"{s}: {a.name}" for s, a in person.accounts.items())
                w(f"  #   {person.display_name} ({where})")
        else:
            w("  # jfsync init found nobody with an account on two servers; add users.map.")
        for server, names in match.unmatched.items():
            w(f"  #   only on {server}, not synced: {', '.join(names)}")
        for server, names in match.disabled.items():
            w(f"  #   disabled on {server}, skipped: {', '.join(names)}")
    w("  match: name")
    w("  # map:")
    w("  #   - {" + ", ".join(f"{a.name}: someone" for a in answers[:2]) + "}")
    w("  # exclude: [guest]")
    w("  # Per person: sync only some registers, or opt out entirely:")
    w("  # choices:")
    w("  #   alice: {fields: [play_state]}")
    w("  #   bob: {sync: false}")
    w()
    w("sync:")
    w("  # What is synced: favorite, rating, play_state (played, count, position, date).")
    w("  fields: [favorite, rating, play_state]")
    w("  # How often every library and user is compared in full.")
    w("  reconcile_interval: 6h")
    w("  # When two servers first meet: merge (keep history from both) or seed (seed_server wins).")
    w("  initial_merge: merge")
    w()
    w("status:")
    w("  # /status, /healthz and /metrics; keep it on loopback or give a token.")
    w("  listen: 127.0.0.1:8097")
    w()
    w("logging:")
    w("  level: info")
    return buf.getvalue()
