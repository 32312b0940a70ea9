"""The catalogue of bad input a new user can give jfsync, one :class:`Case` each.

Each case writes a config (and, for the ledger cases, a broken ledger file) into a directory
and names what the single line jfsync answers must contain: where (the key path or the
file) and the fix. The cases use real-looking secrets so the tests can check none leaks.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jfsync.sync.ledger.schema import LATEST_VERSION

API_A = "a1b2c3d4e5f6a7b8c9d0aaaa1111secret"
API_B = "f6e5d4c3b2a1f0e9d8c7bbbb2222secret"
PASSWORD = "hunter2-very-secret-pw"
TOKEN = "0badc0ffee0badc0ffeetoken99"
#: Every secret a case may contain; none may appear in any output.
SECRETS = (API_A, API_B, PASSWORD, TOKEN)
#: The config file name each case writes.
CONFIG = "jfsync.yaml"


def config(
    a: str = "", b: str = "", top: str = "", *, a_key: str | None = None, ledger: str = "j.db"
) -> str:
    """A valid two-server config, with extra lines for server ``a``, ``b`` and the top level.

    ``a_key`` replaces server a's ``api_key`` line (give ``""`` to leave it out).
    """
    key_a = f"    api_key: {API_A}\n" if a_key is None else a_key
    return (
        f"ledger: {ledger}\n"
        f"{top}"
        "servers:\n"
        "  - name: home\n"
        "    url: http://127.0.0.1:1\n"
        f"{key_a}{a}"
        "  - name: cabin\n"
        "    url: http://127.0.0.1:2\n"
        f"    api_key: {API_B}\n"
        f"{b}"
    )


Setup = Callable[[Path], None]
CHECK = ("check",)
BOTH = ("check", "run")
RUN = ("run",)


@dataclass(frozen=True)
class Case:
    """One bad input: the config text (or bytes), what the answer names, and its fix."""

    name: str
    text: str | bytes | None
    where: str
    fix: str
    setup: Setup | None = None
    #: Also run through the real CLI in a subprocess: ``check`` (--offline), ``run``.
    subprocess: tuple[str, ...] = ()
    #: Skipped as root (root writes anywhere, so the input is not bad for it).
    needs_non_root: bool = False


# --------------------------------------------------------------------------- ledger set-ups


def _ledger_bytes() -> bytes:
    """The bytes of a sound, closed ledger of the latest schema (built once, cached)."""
    cached = _LEDGER_CACHE.get("bytes")
    if cached is not None:
        return cached
    import asyncio
    import tempfile

    from jfsync.sync.ledger import Ledger
    from jfsync.sync.merge import MergePolicy

    async def build(path: Path) -> None:
        policy = MergePolicy(servers=("home", "cabin"))
        async with Ledger(path, policy) as ledger:
            await ledger.save_token("home", "u1", TOKEN)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        asyncio.run(build(path))
        data = path.read_bytes()
    _LEDGER_CACHE["bytes"] = data
    return data


_LEDGER_CACHE: dict[str, bytes] = {}


def _write(name: str, content: bytes) -> Setup:
    def setup(root: Path) -> None:
        (root / name).write_bytes(content)

    return setup


def _truncated(root: Path) -> None:
    data = _ledger_bytes()
    (root / "j.db").write_bytes(data[: len(data) // 2])


def _corrupt(root: Path) -> None:
    data = bytearray(_ledger_bytes())
    data[4096:8192] = bytes(range(256)) * 16
    (root / "j.db").write_bytes(bytes(data))


def _newer(root: Path) -> None:
    (root / "j.db").write_bytes(_ledger_bytes())
    db = sqlite3.connect(root / "j.db")
    db.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    db.commit()
    db.close()


def _foreign(root: Path) -> None:
    db = sqlite3.connect(root / "j.db")
    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    db.commit()
    db.close()


def _read_only_dir(root: Path) -> None:
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)


def _read_only_file(root: Path) -> None:
    (root / "j.db").write_bytes(_ledger_bytes())
    os.chmod(root / "j.db", 0o400)


def _directory(root: Path) -> None:
    (root / "j.db").mkdir()


def _key_file(content: str) -> Setup:
    return _write("key.txt", content.encode())


def _big(root: Path) -> None:
    (root / CONFIG).write_bytes(b"# padding\n" * 200_000)


def _config_dir(root: Path) -> None:
    (root / CONFIG).mkdir()


def _no_config(root: Path) -> None:
    shutil.rmtree(root / CONFIG, ignore_errors=True)


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB

# --------------------------------------------------------------------------- the catalogue

CASES: tuple[Case, ...] = (
    # the file itself
    Case("not_utf8", b"servers: caf\xe9\n", CONFIG, "save the file as UTF-8", subprocess=CHECK),
    Case("utf16", "servers: []\n".encode("utf-16"), CONFIG, "save the file as UTF-8"),
    Case("too_big", None, CONFIG, "is it the right file", setup=_big),
    Case("missing_file", None, CONFIG, "check the path", setup=_no_config),
    Case("directory", None, CONFIG, "give the path of the YAML file", setup=_config_dir),
    Case("empty", "", "servers", "add it"),
    Case("top_level_list", "- home\n- cabin\n", CONFIG, "start with servers:"),
    Case("yaml_syntax", "servers: [\n", "line 2", "correct the YAML there"),
    Case("tab_indent", "servers:\n\t- name: home\n", "line 2", "correct the YAML there"),
    Case("alias_bomb", BOMB, CONFIG, "write the values out", subprocess=CHECK),
    Case("deep_nesting", "servers: " + "[" * 5000 + "]" * 5000 + "\n", CONFIG, "right file"),
    Case("duplicate_key", config(a="    url: http://127.0.0.1:3\n"), "'url'", "keep one"),
    Case(
        "duplicate_top_key",
        config(top="logging: {level: info}\nlogging: {level: debug}\n"),
        "'logging'",
        "keep one",
    ),
    Case("non_text_key", config(top="1: one\n"), "(top level)", "keys are words"),
    Case("unknown_top_key", config(top="ledgr: x.db\n"), "ledgr", "accepted keys here"),
    Case("unknown_server_key", config(a="    apikey: x\n"), "servers[0].apikey", "accepted keys"),
    Case("servers_not_list", "servers: home\n", "servers", "expected a list"),
    Case(
        "one_server",
        f"servers:\n  - {{name: home, url: 'http://h', api_key: {API_A}}}\n",
        "(top level)",
        "add another under servers",
    ),
    Case(
        "duplicate_server_name",
        config().replace("name: cabin", "name: home"),
        "'home'",
        "names must be unique",
    ),
    Case(
        "bad_server_name",
        config().replace("name: cabin", "name: 'my cabin'"),
        "servers[1].name",
        "use letters",
    ),
    # URLs
    Case(
        "url_no_scheme",
        config().replace("http://127.0.0.1:1", "127.0.0.1:1"),
        "servers[0].url",
        "expected http:// or https://",
    ),
    Case(
        "url_bad_scheme",
        config().replace("http://127.0.0.1:1", "htp://x"),
        "servers[0].url",
        "expected http:// or https://",
    ),
    Case(
        "url_userinfo",
        config().replace("http://127.0.0.1:1", f"http://me:{PASSWORD}@h:8096"),
        "servers[0].url",
        "remove 'user:password@'",
        subprocess=BOTH,
    ),
    Case(
        "url_query_with_key",
        config().replace("http://127.0.0.1:1", f"http://h/?api_key={API_A}"),
        "servers[0].url",
        "give only scheme, host, port",
    ),
    Case(
        "url_bad_port",
        config().replace("http://127.0.0.1:1", "http://h:99999"),
        "servers[0].url",
        "expected http(s)://host[:port]",
    ),
    # API keys and other secrets
    Case("api_key_missing", config(a_key=""), "servers[0]", "give api_key"),
    Case(
        "api_key_empty", config(a_key='    api_key: ""\n'), "servers[0].api_key", "give the value"
    ),
    Case(
        "api_key_blank",
        config(a_key='    api_key: "   "\n'),
        "servers[0].api_key",
        "give the value",
    ),
    Case(
        "api_key_spaces",
        config(a_key=f'    api_key: "{API_A} x"\n'),
        "servers[0].api_key",
        "without them",
    ),
    Case(
        "api_key_and_file",
        config(a="    api_key_file: key.txt\n"),
        "servers[0]",
        "give exactly one",
        setup=_key_file(API_A),
    ),
    Case(
        "api_key_file_missing",
        config(a_key="    api_key_file: nokey.txt\n"),
        "servers[0].api_key_file",
        "readable file holding the secret",
    ),
    Case(
        "api_key_file_empty",
        config(a_key="    api_key_file: key.txt\n"),
        "servers[0].api_key_file",
        "put the api_key in it",
        setup=_key_file("\n"),
    ),
    Case(
        "api_key_env_unset",
        config(a_key="    api_key: ${JFSYNC_TEST_UNSET_KEY}\n"),
        "servers[0].api_key",
        "${JFSYNC_TEST_UNSET_KEY:-default}",
    ),
    Case(
        "api_key_env_default_empty",
        config(a_key="    api_key: ${JFSYNC_TEST_UNSET_KEY:-}\n"),
        "servers[0].api_key",
        "give the value",
    ),
    Case(
        "api_key_number",
        config(a_key="    api_key: 12345\n"),
        "servers[0].api_key",
        "should be a valid string",
    ),
    Case(
        "status_token_empty", config(top='status: {token: ""}\n'), "status.token", "give the value"
    ),
    Case(
        "user_token_empty",
        config(a='    users: {bob: {token: ""}}\n'),
        "servers[0].users.bob.token",
        "give the value",
    ),
    Case(
        "user_no_credential",
        config(a="    users: {bob: {}}\n"),
        "servers[0].users.bob",
        "give one of",
    ),
    Case(
        "user_two_credentials",
        config(a=f"    users: {{bob: {{token: {TOKEN}, password: {PASSWORD}}}}}\n"),
        "servers[0].users.bob",
        "give exactly one",
    ),
    # values
    Case(
        "timeout_word",
        config(a="    timeout_s: fast\n"),
        "servers[0].timeout_s",
        "expected seconds or a number with ms, s, m, h or d",
    ),
    Case("timeout_zero", config(a="    timeout_s: 0\n"), "servers[0].timeout_s", "greater than 0"),
    Case(
        "timeout_negative",
        config(a="    timeout_s: -5s\n"),
        "servers[0].timeout_s",
        "expected seconds",
    ),
    Case(
        "verify_tls_word",
        config(a="    verify_tls: maybe\n"),
        "servers[0].verify_tls",
        "valid boolean",
    ),
    Case(
        "max_message_size_word",
        config(a="    max_message_size: huge\n"),
        "servers[0].max_message_size",
        "a number with KiB or MiB",
    ),
    Case(
        "max_message_size_tiny",
        config(a="    max_message_size: 10\n"),
        "servers[0].max_message_size",
        "greater than or equal to 65536",
    ),
    Case(
        "path_rewrite_empty_from",
        config(a="    path_rewrites: [{from: '', to: /m}]\n"),
        "servers[0].path_rewrites[0].from",
        "at least 1 character",
    ),
    Case(
        "status_listen_port_only",
        config(top="status: {listen: '8097'}\n"),
        "status.listen",
        "expected e.g. 127.0.0.1:8097",
    ),
    Case(
        "status_listen_port_range",
        config(top="status: {listen: '0.0.0.0:70000'}\n"),
        "status.listen",
        "expected e.g. 127.0.0.1:8097",
    ),
    Case(
        "users_match_unknown",
        config(top="users: {match: fuzzy}\n"),
        "users.match",
        "expected 'name' or 'map'",
    ),
    Case("users_map_empty", config(top="users: {match: map}\n"), "users.map is empty", "users.map"),
    Case(
        "users_map_unknown_server",
        config(top="users: {map: [{attic: bob, home: bob}]}\n"),
        "users.map[0]",
        "expected cabin, home",
    ),
    Case(
        "sync_field_unknown",
        config(top="sync: {fields: [favourite]}\n"),
        "sync.fields[0]",
        "expected 'favorite', 'rating' or 'play_state'",
    ),
    Case(
        "sync_seed_without_server",
        config(top="sync: {initial_merge: seed}\n"),
        "sync.seed_server",
        "is not set",
    ),
    Case(
        "sync_seed_unknown",
        config(top="sync: {initial_merge: seed, seed_server: attic}\n"),
        "sync.seed_server",
        "expected one of cabin, home",
    ),
    Case(
        "sync_interval_words",
        config(top="sync: {reconcile_interval: 6 hours}\n"),
        "sync.reconcile_interval",
        "expected seconds or a number",
    ),
    Case(
        "logging_level_unknown",
        config(top="logging: {level: verbose}\n"),
        "logging.level",
        "expected 'debug', 'info', 'warning' or 'error'",
    ),
    # the ledger
    Case(
        "ledger_is_directory",
        config(),
        "ledger",
        "give the path of a file in it",
        setup=_directory,
        subprocess=CHECK,
    ),
    Case("ledger_empty_path", config(ledger="''"), "ledger", "give the path of a file in it"),
    Case(
        "ledger_parent_missing", config(ledger="nowhere/j.db"), "ledger", "mkdir -p", subprocess=RUN
    ),
    Case(
        "ledger_empty_file",
        config(),
        "ledger",
        "move it away to start a new ledger",
        setup=_write("j.db", b""),
        subprocess=RUN,
    ),
    Case(
        "ledger_not_sqlite",
        config(),
        "ledger",
        "move it away to start a new ledger",
        setup=_write("j.db", b"hello, this is not a database\n" * 10),
    ),
    Case(
        "ledger_truncated",
        config(),
        "ledger",
        "restore it from a backup",
        setup=_truncated,
        subprocess=BOTH,
    ),
    Case("ledger_corrupt", config(), "ledger", "restore it from a backup", setup=_corrupt),
    Case("ledger_newer_schema", config(), "ledger", "upgrade jfsync", setup=_newer),
    Case(
        "ledger_foreign_sqlite", config(), "ledger", "point ledger at another file", setup=_foreign
    ),
    Case(
        "ledger_dir_read_only",
        config(ledger="ro/j.db"),
        "ledger",
        "make the directory writable",
        setup=_read_only_dir,
        needs_non_root=True,
    ),
    Case(
        "ledger_file_read_only",
        config(),
        "ledger",
        "chmod 600",
        setup=_read_only_file,
        needs_non_root=True,
    ),
)
