"""Pytest plugin: every request jfsync sends to an emulator must be documented by Jellyfin's spec.

An autouse fixture registers an observer in ``jfsync.emulator.request_observers``. For each
request whose ``Client`` is ``jfsync`` it checks, against the official OpenAPI file of the
emulated version, that the path matches a documented route, that the method is documented for
it, and that every query parameter is one that operation documents (names compared without
case, as ASP.NET binds them). The documented legacy ``/Users/{userId}/...`` aliases (missing
from the spec on purpose, fact sheet §4.1 and §9) and the websocket endpoint (not part of the
REST spec, §1.1) are allowed. Violations fail the test at teardown, listing each one.

Versions without a saved spec use the nearest saved one: 10.9 uses 10.10.7, 12 uses 10.11.11.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jfsync import emulator as emulator_module

#: Where the official OpenAPI files live (in the repo, tests/data/openapi/).
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "openapi"
#: Emulated version (major, minor) -> spec file version.
SPEC_FOR_VERSION = {
    (10, 8): "10.8.13",
    (10, 9): "10.10.7",
    (10, 10): "10.10.7",
    (10, 11): "10.11.11",
    (12, 0): "10.11.11",
}
#: Paths a websocket upgrade may use (any path works on the server; jfsync uses these).
WEBSOCKET_PATHS = frozenset({"/socket", "/websocket"})
#: Query parameters a websocket upgrade may carry (§1.2: token and device id as query).
WEBSOCKET_QUERY = frozenset({"apikey", "api_key", "deviceid"})
#: Client name whose requests are checked.
CHECKED_CLIENT = "jfsync"
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
#: The legacy aliases Jellyfin keeps out of the spec (§4.1): /Users/{userId}/ + these templates.
LEGACY_ALIASES = (
    "Items",
    "Items/{itemId}",
    "Items/{itemId}/UserData",
    "Items/{itemId}/Rating",
    "FavoriteItems/{itemId}",
    "PlayedItems/{itemId}",
)


@dataclass(frozen=True)
class Operation:
    """One documented (path template, method) with its query parameter names (lower case)."""

    template: str
    method: str
    query: frozenset[str]


@dataclass
class Spec:
    """The routes of one OpenAPI file, as regexes over request paths."""

    version: str
    routes: list[tuple[re.Pattern[str], str, dict[str, Operation]]]

    def find(self, path: str) -> tuple[str, dict[str, Operation]] | None:
        """Return (template, operations by method) for a request path, or None."""
        for pattern, template, operations in self.routes:
            if pattern.fullmatch(path):
                return template, operations
        return None


@functools.cache
def load_spec(version: str) -> Spec:
    """Load and index the OpenAPI file of ``version`` (cached for the session)."""
    data: dict[str, Any] = json.loads(
        (REFERENCE_DIR / f"jellyfin-openapi-{version}.json").read_text(encoding="utf-8")
    )
    routes = []
    # Literal segments first: "/Users/Me" must win over "/Users/{userId}".
    for template in sorted(data["paths"], key=lambda t: (t.count("{"), t)):
        item = data["paths"][template]
        shared = [p for p in item.get("parameters", []) if p.get("in") == "query"]
        operations = {}
        for method in _HTTP_METHODS:
            op = item.get(method)
            if op is None:
                continue
            params = shared + [p for p in op.get("parameters", []) if p.get("in") == "query"]
            operations[method.upper()] = Operation(
                template, method.upper(), frozenset(p["name"].lower() for p in params)
            )
        routes.append((_template_regex(template), template, operations))
    return Spec(version, routes)


def spec_for(emulated_version: str) -> Spec:
    """Return the spec used to check requests to an emulator of ``emulated_version``."""
    parts = emulated_version.split(".")
    key = (int(parts[0]), int(parts[1]))
    return load_spec(SPEC_FOR_VERSION[key])


@dataclass
class RequestChecker:
    """Collects requests jfsync sent that the spec of the emulated version does not document."""

    violations: list[str] = field(default_factory=list)
    checked: int = 0

    def observe(self, emu: Any, record: Any) -> None:
        """Check one request an emulator answered (called synchronously by the emulator)."""
        if record.client != CHECKED_CLIENT:
            return
        self.checked += 1
        problem = check_request(
            spec_for(emu.version), record.method, record.path, dict(record.query)
        )
        if problem:
            self.violations.append(
                f"{record.method} {record.path} (emulated {emu.version}): {problem}"
            )


def check_request(spec: Spec, method: str, path: str, query: dict[str, Any]) -> str | None:
    """Return why a request is not documented by ``spec``, or None when it is."""
    method = method.upper()
    names = {name.lower() for name in query}
    if method == "GET" and path.rstrip("/").lower() in WEBSOCKET_PATHS:
        extra = names - WEBSOCKET_QUERY
        return f"websocket query parameters not allowed: {sorted(extra)}" if extra else None
    if path.startswith("/__emulator__"):
        return None
    found = spec.find(path)
    if found is None:
        legacy = _legacy_template(path)
        if legacy is not None:
            return None
        return f"route not in the OpenAPI file of {spec.version}"
    template, operations = found
    operation = operations.get(method)
    if operation is None:
        return f"{method} is not documented for {template} (only {', '.join(sorted(operations))})"
    extra = names - operation.query
    if extra:
        return f"query parameters not documented for {method} {template}: {sorted(extra)}"
    return None


def _legacy_template(path: str) -> str | None:
    for tail in LEGACY_ALIASES:
        template = "/Users/{userId}/" + tail
        if _template_regex(template).fullmatch(path):
            return template
    return None


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = ""
    for piece in re.split(r"(\{[^}]+\})", template):
        if piece.startswith("{"):
            pattern += r"[^/]+"
        else:
            pattern += re.escape(piece)
    # Routes are case-insensitive on the server (§4); a trailing slash is tolerated.
    return re.compile(pattern + "/?", re.IGNORECASE)


@pytest.fixture(autouse=True)
def openapi_request_checker() -> Iterator[RequestChecker]:
    """Check every jfsync request of the test against the spec; fail the test on violations."""
    checker = RequestChecker()
    observers = emulator_module.request_observers
    observers.append(checker.observe)
    try:
        yield checker
    finally:
        observers.remove(checker.observe)
    if checker.violations:
        listed = "\n  ".join(checker.violations)
        pytest.fail(f"jfsync sent requests the OpenAPI spec does not document:\n  {listed}")
