"""The Dockerfile and compose files, checked by reading them (Docker cannot run here).

Each compose file is parsed with PyYAML: every file and secret it references exists, every
named volume is declared, the Jellyfin servers share the media source and keep their own config
volumes, and the jfsync service is wired to them (config mount at the path the image runs,
ledger volume, secrets, published status port, depends_on). The config each one mounts is
validated with ``load_config`` after mapping ``/run/secrets/<name>`` to the example files, and
its server URLs, secrets, ledger path and status port are cross-checked with the compose file.
The Dockerfile's commands are parsed with jfsync's own argument parser.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from jfsync.cli import build_parser
from jfsync.config import Config, parse_config
from jfsync.ops import statuscmd

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "compose.yaml", ROOT / "examples" / "compose.three-servers.yaml"]
#: ``${VAR:?message}``: a value the user must give (the media folder); never a repo file.
REQUIRED_VAR = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]*\}$")
#: ``source:target[:mode]`` where the source may be a ``${...}`` holding colons.
MOUNT = re.compile(r"^(\$\{[^}]*\}|[^:]+):(/[^:]*)(?::(ro|rw))?$")


@dataclass
class Dockerfile:
    """The instructions of the Dockerfile, by stage."""

    args: dict[str, str] = field(default_factory=dict)
    stages: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def final(self) -> list[tuple[str, str]]:
        """The runtime stage's instructions."""
        return self.stages[-1]

    def one(self, instruction: str) -> str:
        """The value of the only ``instruction`` in the final stage."""
        found = [value for name, value in self.final if name == instruction]
        assert len(found) == 1, (instruction, found)
        return found[0]


def _dockerfile() -> Dockerfile:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    parsed = Dockerfile()
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        name, value = name.upper(), value.strip()
        if name == "ARG" and not parsed.stages:
            key, _, default = value.partition("=")
            parsed.args[key] = default
            continue
        if name == "FROM":
            parsed.stages.append([])
        assert parsed.stages, f"instruction before FROM: {line}"
        parsed.stages[-1].append((name, value))
    return parsed


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), value
    assert all(isinstance(part, str) for part in parsed), value
    return parsed


def _dockerignore_excludes(path: str) -> bool:
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/")
        parts = PurePosixPath(path).parts
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) or fnmatch.fnmatch(parts[i], pattern)
            for i in range(len(parts))
        )
        if hit:
            excluded = not negate
    return excluded


def _image_config_path() -> str:
    command = _exec_form(_dockerfile().one("CMD"))
    args = build_parser().parse_args(command)
    assert command[0] == "run"
    return str(args.config)


def test_dockerfile_builds_a_slim_non_root_image_with_a_healthcheck() -> None:
    docker = _dockerfile()
    bases = [value.split()[0] for stage in docker.stages for name, value in stage if name == "FROM"]
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: docker.args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image
    # Every file the build copies from the context exists and is not excluded.
    for stage in docker.stages:
        for name, value in stage:
            if name == "COPY" and not value.startswith("--from"):
                *sources, _ = value.split()
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert not _dockerignore_excludes(source), f".dockerignore drops {source}"
    for private in (".git", ".venv", "tests", "examples/secrets/jellyfin-a.api-key", "x.db"):
        assert _dockerignore_excludes(private), f".dockerignore keeps {private}"
    # A non-root user owns /data, the ledger volume.
    user = docker.one("USER")
    assert user not in ("root", "0")
    setup = " ".join(value for name, value in docker.final if name == "RUN")
    assert f"useradd --system --uid 10001 --gid {user}" in setup
    assert f"chown {user}:{user} /data" in setup
    assert _exec_form(docker.one("VOLUME")) == ["/data"]
    assert docker.one("WORKDIR") == "/data"
    # The entrypoint and command are jfsync's own.
    assert _exec_form(docker.one("ENTRYPOINT")) == ["jfsync"]
    assert _image_config_path() == "/config/jfsync.yaml"
    assert docker.one("EXPOSE") == "8097"


def test_healthcheck_is_jfsync_status_healthz_without_curl() -> None:
    docker = _dockerfile()
    options, _, command = docker.one("HEALTHCHECK").partition(" CMD ")
    flags = dict(flag.removeprefix("--").split("=") for flag in shlex.split(options))
    assert set(flags) == {"interval", "timeout", "start-period", "retries"}
    argv = _exec_form(command)
    assert argv[0] == "jfsync"
    args = build_parser().parse_args(argv[1:])
    assert args.handler is statuscmd.run
    assert args.healthz
    assert args.config == _image_config_path()
    # The request timeout stays under Docker's, so a hung ledger reports unhealthy, not a kill.
    assert args.timeout < int(flags["timeout"].removesuffix("s"))
    text = (ROOT / "Dockerfile").read_text()
    assert "curl" not in text.replace("needs no curl", "")
    assert "wget" not in text


def _compose(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of every short-syntax volume of a service."""
    found = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short syntax: {entry}"
        match = MOUNT.match(entry)
        assert match, entry
        source, target, mode = match.groups()
        found.append((source, target, mode or "rw"))
    return found


def _jellyfins(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("jellyfin/jellyfin:")
    }


def _mounted_config(path: Path, compose: dict[str, Any]) -> tuple[dict[str, Any], Config]:
    """The config the jfsync service mounts (raw YAML), validated with its secrets mapped."""
    jfsync = compose["services"]["jfsync"]
    [source] = [s for s, t, _ in _mounts(jfsync) if t == _image_config_path()]
    config_file = (path.parent / source).resolve()
    assert config_file.is_file(), config_file
    text = config_file.read_text(encoding="utf-8")
    for name in jfsync.get("secrets", []):
        secret_file = (path.parent / compose["secrets"][name]["file"]).resolve()
        text = text.replace(f"/run/secrets/{name}", str(secret_file))
    assert "/run/secrets/" not in text, "the config reads a secret the service does not mount"
    config = parse_config(text, base_dir=config_file.parent, environ={}, source=source)
    return yaml.safe_load(config_file.read_text(encoding="utf-8")), config


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_references_exist_and_are_declared(path: Path) -> None:
    compose = _compose(path)
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    declared_secrets = compose.get("secrets") or {}
    used_volumes: set[str] = set()
    for name, service in services.items():
        for source, _, _ in _mounts(service):
            if REQUIRED_VAR.match(source):
                continue  # the user's own folder, given when starting
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
        for secret in service.get("secrets", []):
            assert secret in declared_secrets, f"{name}: secret {secret} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build["context"]
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (path.parent / context / dockerfile).resolve() == ROOT / "Dockerfile"
    assert used_volumes == declared_volumes, "declared volumes nobody uses"
    for name, secret in declared_secrets.items():
        assert (path.parent / secret["file"]).is_file(), f"secret {name}: no {secret['file']}"
        assert "REPLACE-ME" in (path.parent / secret["file"]).read_text(), (
            "example secrets are fake"
        )


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_jellyfin_servers_share_the_media_and_keep_their_own_config(path: Path) -> None:
    compose = _compose(path)
    jellyfins = _jellyfins(compose)
    assert len(jellyfins) >= 2
    config_volumes = []
    media_sources = set()
    for service in jellyfins.values():
        mounts = {target: source for source, target, _ in _mounts(service)}
        config_volumes.append(mounts["/config"])
        media = [(s, t, m) for s, t, m in _mounts(service) if t not in ("/config", "/cache")]
        [(source, _, mode)] = media
        assert mode == "ro", "jfsync needs no write access to media; neither do the servers"
        media_sources.add(source)
    assert len(set(config_volumes)) == len(jellyfins), "each server needs its own /config"
    assert len(media_sources) == 1, "every server must see the same media folder"
    published = [p.split(":")[-2] for s in jellyfins.values() for p in s.get("ports", [])]
    assert len(set(published)) == len(published), "two servers publish the same host port"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_jfsync_service_is_wired_to_the_servers_and_its_config_validates(path: Path) -> None:
    compose = _compose(path)
    jellyfins = _jellyfins(compose)
    jfsync = compose["services"]["jfsync"]
    raw, config = _mounted_config(path, compose)

    assert set(jfsync["depends_on"]) == set(jellyfins)
    # One configured server per Jellyfin service, reached by service name on its port 8096.
    hosts = {urlsplit(server.url).hostname: urlsplit(server.url).port for server in config.servers}
    assert hosts == dict.fromkeys(jellyfins, 8096)
    # Every server's key comes from a docker secret the service mounts.
    for entry, server in zip(raw["servers"], config.servers, strict=True):
        secret = entry["api_key_file"].removeprefix("/run/secrets/")
        assert secret in jfsync["secrets"], entry
        assert server.api_key is not None
        assert server.api_key.get_secret_value().startswith("REPLACE-ME")
    # The ledger is on the /data volume, which is a named volume.
    assert PurePosixPath(str(config.ledger)).parent == PurePosixPath("/data")
    mounts = {target: source for source, target, _ in _mounts(jfsync)}
    assert mounts["/data"] in (compose.get("volumes") or {})
    # The status endpoint listens on every interface and its port is published.
    assert config.status.host == "0.0.0.0"
    published = [str(port).rsplit(":", 1) for port in jfsync["ports"]]
    assert [container for _, container in published] == [str(config.status.port)]
    host_side = published[0][0]
    if config.status.token is None:
        # No token: publish on the host's loopback only.
        assert host_side.startswith("127.0.0.1:"), host_side
    # Longer than the shutdown grace, so `docker compose down` lets writes finish.
    grace_s = int(str(jfsync["stop_grace_period"]).removesuffix("s"))
    assert grace_s > config.sync.shutdown_grace


def test_rewrites_example_maps_the_odd_mount_to_the_shared_path() -> None:
    path = COMPOSE_FILES[1]
    compose = _compose(path)
    _, config = _mounted_config(path, compose)
    targets = {
        name: next(t for _, t, _ in _mounts(s) if t not in ("/config", "/cache"))
        for name, s in _jellyfins(compose).items()
    }
    assert targets["jellyfin-c"] != targets["jellyfin-a"]
    server_c = config.server("jellyfin-c")
    film = f"{targets['jellyfin-c']}/Films/Heat (1995)/Heat.mkv"
    assert server_c.rewrite_path(film) == f"{targets['jellyfin-a']}/Films/Heat (1995)/Heat.mkv"
    assert config.server("jellyfin-a").rewrite_path("/media/x.mkv") == "/media/x.mkv"
    assert config.status.token is not None
    assert "REPLACE-ME" in config.status.token.get_secret_value()
