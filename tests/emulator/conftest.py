"""Fixtures for the emulator's tests: emulators on loopback, an HTTP helper, spec validators."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import FormatChecker
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from jfsync.emulator import Emulator
from jfsync.timing import ManualClock
from tests.support.emulators import MakeEmulator, emulator_factory

API_KEY = "0123456789abcdef0123456789abcdef"
USERS = [("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")]
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "openapi"
_SPEC_URI = "urn:jellyfin-openapi"


def auth_header(
    token: str | None = None,
    *,
    client: str = "emu-test",
    device: str = "pytest",
    device_id: str = "pytest-device",
    version: str = "1.0.0",
) -> dict[str, str]:
    """Build the ``Authorization: MediaBrowser …`` header."""
    parts = [
        f'Client="{client}"',
        f'Device="{device}"',
        f'DeviceId="{device_id}"',
        f'Version="{version}"',
    ]
    if token is not None:
        parts.append(f'Token="{token}"')
    return {"Authorization": "MediaBrowser " + ", ".join(parts)}


@dataclass
class Reply:
    """A status and the decoded body (JSON when it is JSON, else text)."""

    status: int
    body: Any
    content_type: str


class Http:
    """A small HTTP helper bound to one emulator and one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, emu: Emulator) -> None:
        self.session = session
        self.emu = emu

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = API_KEY,
        params: dict[str, str] | list[tuple[str, str]] | None = None,
        json_body: Any = None,
        data: str | bytes | None = None,
        headers: dict[str, str] | None = None,
        device_id: str = "pytest-device",
    ) -> Reply:
        """Send a request (with the admin key by default) and decode the answer."""
        sent = dict(auth_header(token, device_id=device_id)) if headers is None else headers
        async with self.session.request(
            method, self.emu.url + path, params=params, json=json_body, data=data, headers=sent
        ) as resp:
            text = await resp.text()
            body: Any = text
            if "json" in resp.content_type and text:
                body = json.loads(text)
            return Reply(resp.status, body, resp.content_type)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        """GET."""
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        """POST."""
        return await self.call("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Reply:
        """DELETE."""
        return await self.call("DELETE", path, **kwargs)

    async def ws(
        self, token: str | None, *, device_id: str = "ws-device", path: str = "/socket", **kw: Any
    ) -> aiohttp.ClientWebSocketResponse:
        """Open a websocket authenticated with the header (the caller closes it)."""
        headers = auth_header(token, client="jfsync-test", device_id=device_id)
        return await self.session.ws_connect(self.emu.url + path, headers=headers, **kw)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp session per test."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock for tests where time matters."""
    return ManualClock()


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Start emulators (small library, three users) and close them all after the test."""
    async with emulator_factory(
        api_key=API_KEY,
        users=USERS,
        library_size=60,
        seed=3,
        server_version="10.10.7",
    ) as make:
        yield make


@pytest.fixture
async def emu(make_emulator: MakeEmulator) -> Emulator:
    """A 10.10.7 emulator on the system clock."""
    return await make_emulator()


@pytest.fixture
def http(session: aiohttp.ClientSession, emu: Emulator) -> Http:
    """An HTTP helper for ``emu``."""
    return Http(session, emu)


async def next_message(
    ws: aiohttp.ClientWebSocketResponse, kind: str | None = None, timeout_s: float = 5.0
) -> dict[str, Any]:
    """Wait (on the socket, not on time) for the next JSON message, optionally of one type."""
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended: {msg.type} {msg.data!r}")
            payload: dict[str, Any] = json.loads(msg.data)
            if kind is None or payload.get("MessageType") == kind:
                return payload


async def no_message(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Assert nothing is waiting on the socket now (after the loop has settled)."""
    for _ in range(20):
        await asyncio.sleep(0)
    try:
        async with asyncio.timeout(0.05):
            msg = await ws.receive()
    except TimeoutError:
        return
    raise AssertionError(f"unexpected message: {msg.type} {msg.data!r}")


# --- OpenAPI validation -----------------------------------------------------------------


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())

    @checker.checks("uuid")
    def _uuid(value: object) -> bool:
        # Jellyfin writes Guids as 32 lowercase hex digits (fact sheet §1.3).
        return not isinstance(value, str) or re.fullmatch(r"[0-9a-f]{32}", value) is not None

    @checker.checks("date-time")
    def _date(value: object) -> bool:
        pattern = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z"
        return not isinstance(value, str) or re.fullmatch(pattern, value) is not None

    @checker.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker


class SpecValidator:
    """Validates bodies against one official OpenAPI file (refs resolved, formats strict)."""

    def __init__(self, version: str) -> None:
        path = REFERENCE_DIR / f"jellyfin-openapi-{version}.json"
        self.version = version
        self.spec: dict[str, Any] = json.loads(path.read_text())
        resource = Resource.from_contents(self.spec, default_specification=DRAFT4)
        self.registry: Registry[Any] = Registry().with_resource(_SPEC_URI, resource)
        self.checker = _format_checker()

    def response_pointer(self, template: str, method: str, status: str = "200") -> str | None:
        """Return the JSON pointer of a route's JSON response schema, or None if it has none."""
        operation = self.spec["paths"].get(template, {}).get(method.lower())
        if operation is None:
            return None
        content = operation["responses"].get(status, {}).get("content", {})
        if "application/json" not in content:
            return None
        escaped = template.replace("~", "~0").replace("/", "~1")
        return (
            f"/paths/{escaped}/{method.lower()}/responses/{status}/content/application~1json/schema"
        )

    def validate_pointer(self, pointer: str, instance: Any) -> None:
        """Validate ``instance`` against the schema at ``pointer``; raise on any error."""
        schema = {"$ref": f"{_SPEC_URI}#{pointer}"}
        validator = OAS30Validator(schema, registry=self.registry, format_checker=self.checker)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        if errors:
            text = "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
            raise AssertionError(f"{self.version} {pointer}: {text}")

    def validate_response(self, template: str, method: str, instance: Any) -> None:
        """Validate a 200 body against the route's documented response schema."""
        pointer = self.response_pointer(template, method)
        assert pointer is not None, f"{method} {template} has no JSON 200 in {self.version}"
        self.validate_pointer(pointer, instance)

    def validate_schema(self, name: str, instance: Any) -> None:
        """Validate against ``components/schemas/<name>``."""
        self.validate_pointer(f"/components/schemas/{name}", instance)


@functools.cache
def spec_validator(version: str) -> SpecValidator:
    """Load each big spec file once per test session."""
    return SpecValidator(version)
