"""The one way tests build a jfsync configuration: as a dict, a :class:`Config` or a YAML file.

:func:`config_dict` lays out the servers (emulators or name → URL) with their API keys and any
top-level sections a test sets (``ledger``, ``sync``, ``status``, ``users``, ``logging``…);
:func:`make_config` validates it into a :class:`Config` for an in-process service and
:func:`write_config` writes it as the YAML file a ``jfsync`` command line reads. Tests that
check how a particular config *text* is parsed keep that text in the test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jfsync.config import Config
from jfsync.emulator import Emulator

#: The API key the test emulators accept unless a test gives its own.
API_KEY = "0123456789abcdef0123456789abcdef"


def free_port() -> int:
    """A free loopback port (for a status endpoint a child process or ``run_service`` binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Servers = Mapping[str, "str | Emulator"] | Iterable[Emulator]


def config_dict(
    servers: Servers,
    *,
    api_key: str | Mapping[str, str] = API_KEY,
    timeout_s: float | None = None,
    server_extra: Mapping[str, Mapping[str, Any]] | None = None,
    ledger: Path | str | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A raw config: one entry per server (in the order given) plus the sections set.

    ``servers`` maps names to URLs or emulators, or lists emulators (named by their server
    name). ``api_key`` is one key for all or a key per name; ``server_extra`` adds keys to a
    server's entry; sections given as ``None`` are left out.
    """
    named: dict[str, str] = {}
    if isinstance(servers, Mapping):
        for name, target in servers.items():
            named[name] = target.url if isinstance(target, Emulator) else target
    else:
        named = {emu.server_name: emu.url for emu in servers}
    entries = []
    for name, url in named.items():
        entry: dict[str, Any] = {
            "name": name,
            "url": url,
            "api_key": api_key if isinstance(api_key, str) else api_key[name],
        }
        if timeout_s is not None:
            entry["timeout_s"] = timeout_s
        entry.update((server_extra or {}).get(name, {}))
        entries.append(entry)
    raw: dict[str, Any] = {}
    if ledger is not None:
        raw["ledger"] = str(ledger)
    raw.update({key: value for key, value in sections.items() if value is not None})
    raw["servers"] = entries
    return raw


def make_config(servers: Servers, **kwargs: Any) -> Config:
    """:func:`config_dict` validated into a :class:`Config`."""
    return Config.model_validate(config_dict(servers, **kwargs))


def write_config(path: Path, servers: Servers, **kwargs: Any) -> Path:
    """:func:`config_dict` written to ``path`` as YAML; returns ``path``."""
    raw = config_dict(servers, **kwargs)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path
