"""The YAML configuration: pydantic models, secret resolution and one-line-per-problem errors.

``load_config(path)`` reads the file, replaces ``${VAR}`` references from the environment,
reads ``*_file`` secrets (docker secrets) relative to the config file, validates everything
with ``extra="forbid"`` models, and raises :class:`jfsync.errors.ConfigError` whose
``problems`` name the key path, what was wrong and what is accepted, for example
``servers[1].url: not a URL ('htp://x'); expected http:// or https://``. Secrets are
``SecretStr`` and never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from jfsync.errors import ConfigError
from jfsync.jellyfin.messages import MAX_MESSAGE_BYTES
from jfsync.model import Register

DEFAULT_STATUS_LISTEN = "127.0.0.1:8097"
DEFAULT_RECONCILE_INTERVAL_S = 6 * 3600.0
#: How often every server's user list is read again (accounts created or removed since).
DEFAULT_USER_REFRESH_INTERVAL_S = 600.0
#: Shorter refresh periods only load the servers (one /Users call each, every time).
MIN_USER_REFRESH_INTERVAL_S = 10.0
#: Reset guard defaults (see jfsync.sync.resetguard): at least this many items, and at least this
#: share of the user's non-default items on that server, back to never-touched at once.
DEFAULT_RESET_GUARD_MIN_ITEMS = 5
DEFAULT_RESET_GUARD_FRACTION = 0.8
#: Playback: a session quiet this long has gone (jfsync.sync.sessions); the shortest
#: ``sync.live_progress`` period (each one reads and writes every playing item).
DEFAULT_SESSION_QUIET_S = 60.0
MIN_LIVE_PROGRESS_S = 5.0

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _parse_duration(value: object) -> object:
    """Accept seconds as a number, or a string such as ``90s``, ``30m``, ``6h``, ``1d``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f"not a duration ({value!r}); expected seconds or a number with ms, s, m, h or d"
            )
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _parse_size(value: object) -> object:
    """Accept bytes as a number, or a string such as ``64MiB``, ``64MB``, ``512K``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size ({value!r}); expected bytes, or a number with KiB or MiB")
        unit = (match.group(2) or "")[:1].lower()
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    return value


#: The smallest websocket message limit accepted: Jellyfin's ordinary messages fit well within.
MIN_MESSAGE_BYTES = 64 * 1024
#: The largest websocket message limit accepted (a message is held in memory whole).
MAX_MESSAGE_BYTES_LIMIT = 1024 * 1024 * 1024
#: A size in bytes, e.g. servers[].max_message_size.
ByteSize = Annotated[int, BeforeValidator(_parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number or too big
    except ValueError:
        raise ValueError(
            f"not a URL ({_url_shown(value)!r}); expected http(s)://host[:port][/base path]"
        ) from None
    if "@" in parts.netloc:
        raise ValueError(
            f"the URL holds a user name or password ({_url_shown(value)!r}); jfsync signs in "
            "with the API key: remove 'user:password@' from the URL"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a URL ({value!r}); expected http:// or https:// and a host")
    if parts.query or parts.fragment:
        # Not echoed: a query is where a key would be pasted (?api_key=...).
        raise ValueError(
            "URL has a query or fragment (?... or #...); give only scheme, host, port and base path"
        )
    return value.rstrip("/")


def _url_shown(value: str) -> str:
    """``value`` with anything before an ``@`` in its host part hidden (it may be a password)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{path}"


def _check_secret(value: SecretStr | None, name: str) -> SecretStr | None:
    """Refuse an empty secret, or one with spaces or control characters (a paste gone wrong)."""
    if value is None:
        return None
    text = value.get_secret_value()
    if not text.strip():
        raise ValueError(f"{name} is empty; give the value, or leave the key out")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(
            f"{name} contains spaces, line breaks or control characters; give it on one line "
            "without them (a *_file is read with surrounding whitespace stripped)"
        )
    return value


class UserCredentials(_Strict):
    """Fallback credentials for one user on one server, when Quick Connect is not available."""

    token: SecretStr | None = None
    token_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value, "the token")

    @model_validator(mode="after")
    def _one_source(self) -> UserCredentials:
        names = ("token", "token_file", "password", "password_file")
        given = [n for n in names if getattr(self, n) is not None]
        if not given:
            raise ValueError(f"no credential; give one of {', '.join(names)}")
        if len(given) > 1:
            raise ValueError(f"several credentials ({', '.join(given)}); give exactly one")
        return self


class PathRewrite(_Strict):
    """Rewrite a server's path prefix to the shared form used to match items across servers."""

    from_: str = Field(alias="from", min_length=1)
    to: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def apply(self, path: str) -> str | None:
        """Return ``path`` with the prefix replaced, or None when the prefix does not match."""
        if path == self.from_ or path.startswith(self.from_.rstrip("/") + "/"):
            return self.to.rstrip("/") + path[len(self.from_.rstrip("/")) :]
        return None


# --------------------------------------------------------------------------- issue 14: filters,
# direction and per-user choices (kept together; see the README "Choosing what syncs")

#: ``servers[].mode``: ``both`` sends its users' changes and receives the others'; ``send`` only
#: sends (jfsync never writes to it); ``receive`` only receives (its own changes stay local).
ServerMode = Literal["both", "send", "receive"]


class LibraryFilter(_Strict):
    """Which of a server's libraries jfsync touches, by library name (case-insensitive).

    Give ``include`` (only these) or ``exclude`` (all but these), not both. Items of a library
    left out are never read or written: scans skip it, its events are ignored, nothing is queued
    for it.
    """

    include: list[str] | None = None
    exclude: list[str] | None = None

    @field_validator("include", "exclude")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        seen: set[str] = set()
        for name in value:
            if not name.strip():
                raise ValueError("an empty library name; give the name Jellyfin shows")
            if name.casefold() in seen:
                raise ValueError(f"library {name!r} is listed twice")
            seen.add(name.casefold())
        return value

    @model_validator(mode="after")
    def _one_list(self) -> LibraryFilter:
        if self.include is not None and self.exclude is not None:
            raise ValueError("both include and exclude given; give one of them")
        if self.include is None and self.exclude is None:
            raise ValueError("give include (only these libraries) or exclude (all but these)")
        if self.include is not None and not self.include:
            raise ValueError("include is empty: nothing of this server would sync")
        return self

    def allows(self, name: str) -> bool:
        """Tell whether the library called ``name`` is synced."""
        folded = name.casefold()
        if self.include is not None:
            return folded in {n.casefold() for n in self.include}
        return folded not in {n.casefold() for n in self.exclude or ()}


class UserChoice(_Strict):
    """One person's choices: whether they are synced at all, and which registers."""

    sync: bool = True
    fields: list[Register] | None = None

    @field_validator("fields")
    @classmethod
    def _some_fields(cls, value: list[Register] | None) -> list[Register] | None:
        if value is not None and not value:
            raise ValueError("fields is empty; to stop syncing this user give sync: false")
        return value


class ServerConfig(_Strict):
    """One Jellyfin server."""

    name: str
    url: str
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    path_rewrites: list[PathRewrite] = Field(default_factory=list)
    users: dict[str, UserCredentials] = Field(default_factory=dict)
    verify_tls: bool = True
    timeout_s: Duration = 10.0
    max_message_size: ByteSize = Field(
        default=MAX_MESSAGE_BYTES, ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES_LIMIT
    )
    #: Issue 14: direction and library filters (see LibraryFilter, ServerMode).
    mode: ServerMode = "both"
    libraries: LibraryFilter | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"not a valid server name ({value!r}); use letters, digits, '-', '_' or '.'"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value, "the API key")

    @model_validator(mode="after")
    def _one_key(self) -> ServerConfig:
        if self.api_key is None and self.api_key_file is None:
            raise ValueError("no API key; give api_key (or ${ENV}) or api_key_file")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("both api_key and api_key_file given; give exactly one")
        return self

    def rewrite_path(self, path: str) -> str:
        """Apply the first matching path rewrite, or return ``path`` unchanged."""
        for rule in self.path_rewrites:
            rewritten = rule.apply(path)
            if rewritten is not None:
                return rewritten
        return path


class StatusConfig(_Strict):
    """The status, health and metrics HTTP endpoint."""

    listen: str = DEFAULT_STATUS_LISTEN
    token: SecretStr | None = None
    token_file: Path | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would silently leave the endpoint open.
        return _check_secret(value, "the status token")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not host:port ({value!r}); expected e.g. 127.0.0.1:8097")
        return value

    @property
    def host(self) -> str:
        """The address to bind."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port to bind."""
        return int(self.listen.rpartition(":")[2])


#: What alerts can be sent about (``alerts.events``).
AlertEvent = Literal["peer_down", "dead_rows", "reset_guard", "auth_failed"]
ALERT_EVENTS: tuple[AlertEvent, ...] = ("peer_down", "dead_rows", "reset_guard", "auth_failed")
DEFAULT_PEER_DOWN_AFTER_S = 300.0


class AlertTarget(_Strict):
    """Where alerts go: a JSON ``webhook``, an ``ntfy`` topic URL or a ``gotify`` server."""

    kind: Literal["webhook", "ntfy", "gotify"]
    url: str
    #: webhook and ntfy: sent as ``Authorization: Bearer``; gotify: the application token.
    token: SecretStr | None = None
    token_file: Path | None = None
    #: How the target is named in logs (the URL is not logged: it may hold a secret).
    name: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_secret(value, "the alert token")

    @model_validator(mode="after")
    def _gotify_needs_a_token(self) -> AlertTarget:
        if self.kind == "gotify" and self.token is None:
            raise ValueError(
                "a gotify target needs the application token (token or token_file): create an "
                "application in Gotify (Apps) and give its token"
            )
        return self

    @property
    def label(self) -> str:
        """The target as logs show it: its name, else kind and host (never path or token)."""
        return self.name or f"{self.kind} {urlsplit(self.url).hostname}"


class AlertsConfig(_Strict):
    """Optional notifications when something needs a person (README, "Alerts")."""

    targets: list[AlertTarget] = Field(default_factory=list)
    events: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS))
    #: A server unreachable (or with no live socket) this long is reported.
    peer_down_after: Duration = DEFAULT_PEER_DOWN_AFTER_S
    #: How often the conditions are checked.
    check_interval: Duration = 10.0


class UsersConfig(_Strict):
    """How users are matched across servers, and who is left alone."""

    match: Literal["name", "map"] = "name"
    map: list[dict[str, str]] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    #: Issue 14: per-person choices, keyed by account name (any server's, case-insensitive).
    choices: dict[str, UserChoice] = Field(default_factory=dict)

    def choice_for(self, names: list[str]) -> UserChoice | None:
        """The choices that name one of ``names`` (a person's account names), if any."""
        folded = {n.casefold() for n in names}
        for name, choice in self.choices.items():
            if name.casefold() in folded:
                return choice
        return None

    def opted_out(self) -> set[str]:
        """Casefolded account names whose person chose ``sync: false``."""
        return {n.casefold() for n, c in self.choices.items() if not c.sync}


class SyncConfig(_Strict):
    """What is synced and how the first meeting of two servers is merged."""

    fields: list[Register] = Field(default_factory=lambda: list(Register))
    reconcile_interval: Duration = DEFAULT_RECONCILE_INTERVAL_S
    initial_merge: Literal["merge", "seed"] = "merge"
    seed_server: str | None = None
    shutdown_grace: Duration = 10.0
    user_refresh_interval: Duration = DEFAULT_USER_REFRESH_INTERVAL_S

    @field_validator("user_refresh_interval")
    @classmethod
    def _refresh_often_enough(cls, value: float) -> float:
        if value < MIN_USER_REFRESH_INTERVAL_S:
            raise ValueError(
                f"too short ({value:g} s); the user list of every server is read each time; "
                f"expected at least {MIN_USER_REFRESH_INTERVAL_S:g}s (default "
                f"{DEFAULT_USER_REFRESH_INTERVAL_S / 60:g}m)"
            )
        return value

    #: What a catch-up does when a server shows one user's data wiped: ``restore`` it from the
    #: canonical state, ``hold`` it for ``jfsync accept-reset``, or ``off`` (propagate it).
    reset_guard: Literal["restore", "hold", "off"] = "restore"
    reset_guard_min_items: int = DEFAULT_RESET_GUARD_MIN_ITEMS
    reset_guard_fraction: float = DEFAULT_RESET_GUARD_FRACTION

    @field_validator("reset_guard_min_items", mode="before")
    @classmethod
    def _min_items(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"not a positive whole number ({value!r}); expected the smallest count of "
                f"items that can be a lost server, e.g. {DEFAULT_RESET_GUARD_MIN_ITEMS}"
            )
        return value

    @field_validator("reset_guard_fraction", mode="before")
    @classmethod
    def _fraction(cls, value: object) -> object:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < float(value) <= 1
        ):
            raise ValueError(
                f"not a fraction ({value!r}); expected a number above 0 and at most 1, "
                f"e.g. {DEFAULT_RESET_GUARD_FRACTION} (80 % of the user's items)"
            )
        return float(value)

    # Playback (issue 14 items 5 and 6; jfsync.sync.rewatch, jfsync.sync.sessions).
    #: A played item un-played by starting it again (Jellyfin up to 10.11) stays played on the
    #: other servers until it is finished or explicitly marked unplayed.
    rewatch_protection: bool = True
    #: Follow playback sessions on an administrator socket and re-read an item when its
    #: session ends or goes quiet (a player that crashed never reports a stop).
    follow_sessions: bool = True
    #: A playing session with no progress report for this long has gone quiet (crashed).
    session_quiet: Duration = DEFAULT_SESSION_QUIET_S
    #: While something plays, re-read and spread its position this often (off when unset).
    live_progress: Duration | None = None

    @field_validator("live_progress")
    @classmethod
    def _progress_not_too_often(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_LIVE_PROGRESS_S:
            raise ValueError(
                f"too short ({value:g} s); every playing item is read and written to every "
                f"server each time; expected at least {MIN_LIVE_PROGRESS_S:g}s, e.g. 30s"
            )
        return value


class LoggingConfig(_Strict):
    """Log verbosity."""

    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Strict):
    """The whole jfsync configuration."""

    ledger: Path = Path("./jfsync.db")
    status: StatusConfig = StatusConfig()
    servers: list[ServerConfig]
    users: UsersConfig = UsersConfig()
    sync: SyncConfig = SyncConfig()
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertsConfig = AlertsConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if len(self.servers) < 2:
            raise ValueError("at least two servers are needed; add another under servers")
        seen: set[str] = set()
        for server in self.servers:
            if server.name in seen:
                raise ValueError(f"server name {server.name!r} is used twice; names must be unique")
            seen.add(server.name)
        if self.sync.initial_merge == "seed" and self.sync.seed_server is None:
            raise ValueError("sync.initial_merge is 'seed' but sync.seed_server is not set")
        if self.sync.seed_server is not None and self.sync.seed_server not in seen:
            raise ValueError(
                f"sync.seed_server {self.sync.seed_server!r} is not a server; "
                f"expected one of {', '.join(sorted(seen))}"
            )
        self._check_directions()
        if self.users.match == "map" and not self.users.map:
            raise ValueError("users.match is 'map' but users.map is empty")
        for i, entry in enumerate(self.users.map):
            unknown = set(entry) - seen
            if unknown:
                raise ValueError(
                    f"users.map[{i}] names unknown server(s) {', '.join(sorted(unknown))}; "
                    f"expected {', '.join(sorted(seen))}"
                )
        return self

    def _check_directions(self) -> None:
        """Issue 14: at least one server must send to another that receives."""
        senders = [s.name for s in self.servers if s.mode != "receive"]
        receivers = [s.name for s in self.servers if s.mode != "send"]
        if not senders:
            raise ValueError("every server has mode: receive; nothing would ever be sent")
        if not receivers:
            raise ValueError("every server has mode: send; nothing would ever be written")
        if not any(a != b for a in senders for b in receivers):
            raise ValueError(
                f"only {senders[0]} sends and only it receives; another server must "
                "receive (mode: both or receive)"
            )
        seed = self.sync.seed_server
        receive_only = {s.name for s in self.servers if s.mode == "receive"}
        if self.sync.initial_merge == "seed" and seed in receive_only:
            raise ValueError(f"sync.seed_server {seed!r} has mode: receive; the seed must send")

    def server(self, name: str) -> ServerConfig:
        """Return the server called ``name``."""
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    def secret_values(self) -> list[str]:
        """Every secret in this config, for tests and log scrubbing."""
        found: list[str] = []
        if self.status.token is not None:
            found.append(self.status.token.get_secret_value())
        for server in self.servers:
            if server.api_key is not None:
                found.append(server.api_key.get_secret_value())
            for cred in server.users.values():
                for secret in (cred.token, cred.password):
                    if secret is not None:
                        found.append(secret.get_secret_value())
        for target in self.alerts.targets:
            if target.token is not None:
                found.append(target.token.get_secret_value())
            # A webhook or ntfy topic URL is a secret too (whoever has it can post there).
            found.append(target.url)
        return [s for s in found if s]


# --------------------------------------------------------------------------- loading


#: The largest config file read (bytes). A full config with many servers is a few KB.
MAX_CONFIG_BYTES = 1024 * 1024
#: The largest config once YAML aliases are expanded (nodes): alias "bombs" stop here, fast.
MAX_CONFIG_NODES = 100_000
#: The deepest nesting of YAML collections accepted (a config needs 5 or 6 levels).
MAX_CONFIG_DEPTH = 50


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, resolve and validate the config at ``path``; raise ConfigError listing problems."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory; give the path of the YAML file"]) from None
    except OSError as err:
        raise ConfigError(
            [f"{path}: cannot read the config file ({err.strerror}); check the path and its mode"]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [
                f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a jfsync "
                "config; is it the right file?"
            ]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            [
                f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); "
                "save the file as UTF-8"
            ]
        ) from None
    return parse_config(text, base_dir=path.parent, environ=environ, source=str(path))


def _path_text(path: Path) -> str:
    """A path for a one-line message: quoted and escaped when it holds control characters."""
    text = str(path)
    return repr(text) if any(ord(c) < 32 or ord(c) == 127 for c in text) else text


def load_config_or_report(path: str | Path) -> Config | None:
    """Load the config for a command, or print its problems to stderr (one line each, naming
    the file) and return None; the caller exits with status 2."""
    try:
        return load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            line = problem if problem.startswith(f"{path}: ") else f"{path}: {problem}"
            print(line, file=sys.stderr)
        return None


def parse_config(
    text: str,
    *,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    source: str = "<config>",
) -> Config:
    """Validate config ``text`` (YAML); ``*_file`` paths are relative to ``base_dir``."""
    env = os.environ if environ is None else environ
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES // 1024} KiB; too large"])
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(err, yaml.reader.ReaderError):
            line = text.count("\n", 0, err.position) + 1
            where = f" at line {line}"
            problem: object = (
                f"character #x{err.character:04x} is not allowed in YAML"
                if isinstance(err.character, int)
                else err.reason
            )
        else:
            problem = getattr(err, "problem", None) or err
        problem = " ".join(str(problem).split())  # one line, whatever the parser said
        raise ConfigError(
            [f"{source}: not valid YAML{where}: {problem}; correct the YAML there"]
        ) from None
    except _TooBig as err:
        raise ConfigError([f"{source}: {err}"]) from None
    except RecursionError:
        raise ConfigError(
            [f"{source}: nested too deeply; a jfsync config nests a few levels"]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{source}: expected a mapping of keys at the top level; start with servers:"]
        )
    problems: list[str] = []
    bad_key = _non_text_key(raw, ())
    if bad_key is not None:
        raise ConfigError([bad_key])
    resolved = _resolve_env(raw, (), env, problems)
    _read_secret_files(resolved, (), base_dir, problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(resolved)
    except ValidationError as err:
        raise ConfigError(_describe(err, resolved)) from None
    if not config.ledger.is_absolute():
        config = config.model_copy(update={"ledger": (base_dir / config.ledger)})
    return config


class _TooBig(Exception):
    """The YAML expands past :data:`MAX_CONFIG_NODES` or nests past :data:`MAX_CONFIG_DEPTH`."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (naming them) and deep nesting."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _TooBig(
                    f"nested more than {MAX_CONFIG_DEPTH} levels deep; a jfsync config "
                    "nests a few levels: is it the right file?"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first at line {seen[key]}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """Parse one YAML document; refuse alias bombs and deep nesting before building objects."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_size(root: yaml.Node) -> None:
    """Count the nodes ``root`` stands for with aliases expanded, without expanding them."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk: a deep document must not exhaust Python's stack.
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if id(node) in sizes:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise _TooBig(
                f"nested more than {MAX_CONFIG_DEPTH} levels deep; a jfsync config nests a few "
                "levels: is it the right file?"
            )
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not done:
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 1) for c in children)
        if total > MAX_CONFIG_NODES:
            raise _TooBig(
                f"expands to more than {MAX_CONFIG_NODES} values (YAML aliases: *name); "
                "a config needs few aliases: write the values out"
            )
        sizes[id(node)] = total


_SECRET_FILE_KEYS = {
    "api_key_file": "api_key",
    "token_file": "token",
    "password_file": "password",
}


def _non_text_key(node: Any, loc: tuple[str | int, ...]) -> str | None:
    """The first mapping key that is not text (``1: x``, ``[a]: b``, ``null: c``), described."""
    if isinstance(node, list):
        for i, value in enumerate(node):
            found = _non_text_key(value, (*loc, i))
            if found is not None:
                return found
    elif isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                return (
                    f"{_loc_text(loc)}: key {_shown(key)} is not a name; keys are words "
                    "such as url or api_key"
                )
            found = _non_text_key(value, (*loc, key))
            if found is not None:
                return found
    return None


def _resolve_env(
    node: Any, loc: tuple[str | int, ...], env: Mapping[str, str], problems: list[str]
) -> Any:
    if isinstance(node, dict):
        return {k: _resolve_env(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{_loc_text(loc)}: environment variable {name} is not set; "
                f"set it, or use ${{{name}:-default}}"
            )
            return ""

        return _ENV_REF.sub(substitute, node)
    return node


def _read_secret_files(
    node: Any, loc: tuple[str | int, ...], base_dir: Path, problems: list[str]
) -> None:
    """Replace ``x_file: path`` by ``x: <file content>`` in place (paths relative to base_dir)."""
    if isinstance(node, list):
        for i, value in enumerate(node):
            _read_secret_files(value, (*loc, i), base_dir, problems)
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        value = node[key]
        target = _SECRET_FILE_KEYS.get(key) if isinstance(key, str) else None
        if target is not None and isinstance(value, str):
            if target in node:
                problems.append(
                    f"{_loc_text((*loc, key))}: both {target} and {key} given; give exactly one"
                )
                continue
            if "\x00" in value:
                problems.append(
                    f"{_loc_text((*loc, key))}: the path holds a NUL character; "
                    "expected the path of a file holding the secret"
                )
                continue
            file_path = Path(value)
            if not file_path.is_absolute():
                file_path = base_dir / file_path
            try:
                secret = file_path.read_text(encoding="utf-8").strip()
            except OSError as err:
                problems.append(
                    f"{_loc_text((*loc, key))}: cannot read {_path_text(file_path)} "
                    f"({err.strerror}); expected a readable file holding the secret"
                )
                continue
            except UnicodeDecodeError:
                problems.append(
                    f"{_loc_text((*loc, key))}: {_path_text(file_path)} is not UTF-8 text; "
                    "expected a text file holding the secret"
                )
                continue
            if not secret:
                problems.append(
                    f"{_loc_text((*loc, key))}: {_path_text(file_path)} is empty; "
                    f"put the {target} in it"
                )
                continue
            node[target] = secret
            del node[key]
        else:
            _read_secret_files(value, (*loc, key), base_dir, problems)


def _loc_text(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if str(part).isprintable() else repr(part)  # keep the problem one line
            text += f".{name}" if text else str(name)
    return text or "(top level)"


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """Walk the Config models along ``loc`` and return the model found there, if any."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            for arg in args:
                inner = [a for a in getattr(arg, "__args__", ()) if isinstance(a, type)]
                model = next((a for a in inner if issubclass(a, BaseModel)), None)
                if model is not None:
                    break
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _accepted_keys(model: type[BaseModel]) -> str:
    return ", ".join(f.alias or name for name, f in model.model_fields.items())


def _describe(err: ValidationError, raw: Any) -> list[str]:
    problems: list[str] = []
    for item in err.errors(include_url=False):
        loc = tuple(
            p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        kind = item["type"]
        where = _loc_text(loc)
        value = "(hidden)" if _is_secret_loc(loc) else item.get("input")
        if kind == "missing":
            parent = _model_at(loc[:-1])
            hint = f"; keys here: {_accepted_keys(parent)}" if parent else ""
            problems.append(f"{where}: required but missing; add it{hint}")
        elif kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = f"; accepted keys here: {_accepted_keys(parent)}" if parent else ""
            problems.append(f"{where}: unknown key{hint}")
        elif kind == "value_error":
            message = str(item["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        elif kind in ("enum", "literal_error"):
            expected = item.get("ctx", {}).get("expected", "")
            problems.append(f"{where}: {_shown(value)} is not accepted; expected {expected}")
        elif kind == "model_type" or kind == "dict_type":
            problems.append(f"{where}: expected a mapping of keys, got {_shown(value)}")
        elif kind == "list_type":
            problems.append(f"{where}: expected a list, got {_shown(value)}")
        else:
            message = str(item["msg"])
            problems.append(f"{where}: {message.lower()} (got {_shown(value)})")
    return problems


def _is_secret_loc(loc: tuple[str | int, ...]) -> bool:
    return any(isinstance(p, str) and p in _SECRET_KEYS for p in loc)


_SECRET_KEYS = frozenset({"api_key", "token", "password"})


def _shown(value: Any) -> str:
    if value == "(hidden)":
        return "a hidden value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
