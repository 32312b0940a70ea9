"""The status endpoint: an aiohttp server with ``/status``, ``/healthz`` and ``/metrics``.

:class:`StatusServer` serves one running service, seen through the small interface
:class:`~jfsync.ops.snapshot.StatusSource` (``jfsync.service.SyncService`` satisfies it; this
module does not import it):

* ``GET /status``: the service's snapshot as JSON (shape documented in ``docs/status.md``);
* ``GET /healthz``: 200 while the process runs and the ledger takes a write (a sentinel row
  saved and deleted in the tokens table), else 503 with a ``reason``; for the container
  healthcheck. The ledger path must still name the file jfsync has open (deleted or
  replaced: 503, and the service stops);
* ``GET /metrics``: Prometheus text (:mod:`jfsync.ops.metrics`);
* ``POST /retry-dead`` (optionally ``?server=NAME``): revive the dead rows of every peer, or
  of one, so they are tried again; answers ``{"revived": {server: count}}`` (the route
  ``jfsync retry-dead`` takes while ``jfsync run`` holds the ledger).
* ``POST /reset-holds/accept``: resolve reset holds (``jfsync accept-reset`` while ``jfsync
  run`` holds the ledger): JSON ``{"server": name, "user": name or null, "restore": bool}``;
* ``GET /`` and ``GET /page/{app.js,style.css}``: the status page (files of
  ``jfsync/ops/page``), which polls ``/status`` itself and offers the two actions above.

With ``status.token`` configured every route, unknown ones included, needs
``Authorization: Bearer <token>`` (compared in constant time) and answers 401 otherwise; only
the page's own files are served without it (they hold no data: the page asks for the token
and sends it with every request it makes). A POST whose ``Origin`` is another site is refused
(a page elsewhere cannot make a browser act here). The
token never appears in any answer; every configured secret is replaced by ``***`` in every body
as a second line of defence, and user:password parts of URLs are dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from jfsync.ops.activity import shown_key
from jfsync.ops.metrics import CONTENT_TYPE, Metrics
from jfsync.ops.snapshot import StatusSource, build_status
from jfsync.sync.ledger import LedgerFileLostError

logger = logging.getLogger(__name__)

#: A ledger that cannot take a tiny write within this long counts as unhealthy.
HEALTHZ_TIMEOUT_S = 5.0
#: The sentinel row /healthz writes and deletes (no server id or user id looks like this).
HEALTHZ_SERVER = "jfsync-healthz"
HEALTHZ_USER = "probe"
#: What replaces a secret found in an answer.
REDACTED = "***"
#: Shorter "secrets" are not searched for (the log scrubber draws the same line).
MIN_SECRET_LEN = 4

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The status page's files (package data in jfsync/ops/page) by route, with their types.
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/page/app.js": ("app.js", "text/javascript"),
    "/page/style.css": ("style.css", "text/css"),
}
#: Headers of the page's files: nothing from elsewhere, no framing (the buttons act).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_file(name: str) -> bytes:
    """One file of the status page, as shipped in the package."""
    return resources.files("jfsync.ops").joinpath("page", name).read_bytes()


class StatusServer:
    """Serve /status, /healthz and /metrics for one service on ``host:port``."""

    def __init__(
        self, service: StatusSource, *, host: str, port: int, token: str | None = None
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._token = token.encode() if token else None
        # Longest first, so a secret containing another is replaced whole; like the log
        # scrubber, skip strings too short to replace without garbling every answer.
        self._secrets = sorted(
            {s for s in service.config.secret_values() if len(s) >= MIN_SECRET_LEN},
            key=len,
            reverse=True,
        )
        #: The activity entries' JSON texts of the last status, and what stands for the
        #: feed in the status's text until they are put in (see :meth:`_encode`).
        self._activity_texts: dict[tuple[Any, ...], str] = {}
        self._marker = f"jfsync-activity-{secrets.token_hex(16)}"
        self._encoded_marker = json.dumps(self._marker)
        #: The secrets as they read inside a JSON string (see :meth:`_scrubbed_json`).
        self._encoded_secrets = [json.dumps(s)[1:-1] for s in self._secrets]
        self.metrics = Metrics(s.name for s in service.config.servers)
        self._runner: web.AppRunner | None = None
        self._page_files: dict[str, bytes] = {}

    @classmethod
    def from_config(cls, service: StatusSource) -> StatusServer:
        """Build the server the service's ``status`` config section describes."""
        status = service.config.status
        token = status.token.get_secret_value() if status.token is not None else None
        return cls(service, host=status.host, port=status.port, token=token)

    def __repr__(self) -> str:
        auth = "token" if self._token else "no token"
        return f"<StatusServer {self.host}:{self.port} ({auth})>"

    @property
    def url(self) -> str:
        """The base URL the server listens on (the bound port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._auth_middleware])
        for route in PAGE_FILES:
            app.router.add_get(route, self._page)
        app.router.add_get("/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/retry-dead", self._retry_dead)
        self._add_reset_routes(app)
        # No access log: a scrape every few seconds would drown the lines that matter.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            # Port 0 asks the OS for a free port; report the one it gave.
            self.port = int(runner.addresses[0][1])
        self.service.write_observers.append(self.metrics.observe_write)
        logger.info(
            "status endpoint on %s (page /, /status, /healthz, /metrics; %s)",
            self.url,
            "bearer token required" if self._token else "no token",
        )

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self.metrics.observe_write in self.service.write_observers:
            self.service.write_observers.remove(self.metrics.observe_write)
        await runner.cleanup()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ routes

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and not _same_origin(request):
            return self._json({"error": "a request from another site is refused"}, status=403)
        public = request.method in ("GET", "HEAD") and request.path in PAGE_FILES
        if self._token is not None and not public and not self._authorized(request):
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="jfsync"', "Cache-Control": "no-store"},
            )
        return await handler(request)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        """The status page's files: no data in them, so no token needed to load them."""
        name, content_type = PAGE_FILES[request.path]
        body = self._page_files.get(name)
        if body is None:
            body = self._page_files[name] = page_file(name)
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS
        )

    async def _status(self, request: web.Request) -> web.StreamResponse:
        try:
            snapshot = await build_status(self.service)
        except Exception as err:  # noqa: BLE001 - the endpoint must answer, not crash
            reason = self._scrub_text(f"{type(err).__name__}: {err}")
            logger.warning("status snapshot failed: %s", reason)
            return self._json({"error": f"status unavailable: {reason}"}, status=503)
        return self._scrubbed_json(snapshot)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        ledger = self.service.ledger
        try:
            # The path must still name the file jfsync writes (a deleted or replaced ledger
            # would take writes that nobody will ever read); a lost file stops the service.
            ledger.verify_file()
        except LedgerFileLostError as err:
            reason = self._scrub_text(str(err))
            return self._json({"status": "unhealthy", "reason": reason}, status=503)
        try:
            async with asyncio.timeout(HEALTHZ_TIMEOUT_S):
                await ledger.save_token(HEALTHZ_SERVER, HEALTHZ_USER, "ok")
                await ledger.forget_token(HEALTHZ_SERVER, HEALTHZ_USER)
        except TimeoutError:
            reason = f"the ledger took no write within {HEALTHZ_TIMEOUT_S:.0f} s"
            return self._json({"status": "unhealthy", "reason": reason}, status=503)
        except Exception as err:  # noqa: BLE001 - any failure to write means unhealthy
            reason = self._scrub_text(f"the ledger is not writable: {err}")
            return self._json({"status": "unhealthy", "reason": reason}, status=503)
        return self._json({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        try:
            snapshot = await build_status(self.service)
        except Exception as err:  # noqa: BLE001 - the endpoint must answer, not crash
            reason = self._scrub_text(f"{type(err).__name__}: {err}")
            logger.warning("metrics snapshot failed: %s", reason)
            return web.Response(text=f"# status unavailable: {reason}\n", status=503)
        body = self._scrub_text(self.metrics.render(snapshot).decode()).encode()
        return web.Response(
            body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
        )

    async def _retry_dead(self, request: web.Request) -> web.StreamResponse:
        """Revive the dead rows of every peer (or of ``?server=``) and wake their pushers."""
        names = [s.name for s in self.service.config.servers]
        wanted = request.query.get("server")
        if wanted is not None and wanted not in names:
            return self._json(
                {"error": f"unknown server {wanted!r}; expected one of {', '.join(names)}"},
                status=400,
            )
        revived: dict[str, int] = {}
        try:
            for name in [wanted] if wanted is not None else names:
                revived[name] = await self.service.ledger.retry_dead(name)
                link = self.service.links.get(name)
                if revived[name] and link is not None:
                    link.pusher.wake()
        except Exception as err:  # noqa: BLE001 - the endpoint must answer, not crash
            reason = self._scrub_text(f"cannot revive dead rows: {err}")
            logger.warning("%s", reason)
            return self._json({"error": reason, "revived": revived}, status=503)
        if any(revived.values()):
            logger.info(
                "revived dead rows on request: %s",
                ", ".join(f"{name}={count}" for name, count in revived.items()),
            )
        return self._json({"revived": revived})

    # ------------------------------------------------------------------ reset guard

    def _add_reset_routes(self, app: web.Application) -> None:
        """The reset guard's route (token-protected like every other route)."""
        app.router.add_post("/reset-holds/accept", self._accept_reset)

    async def _accept_reset(self, request: web.Request) -> web.StreamResponse:
        """Resolve the reset holds of one server (one user, or all): accept, or restore."""
        usage = 'expected a JSON object {"server": NAME, "user": NAME or null, "restore": bool}'
        try:
            body = await request.json()
        except ValueError:
            return self._json({"error": f"not JSON; {usage}"}, status=400)
        if not isinstance(body, dict):
            return self._json({"error": usage}, status=400)
        server, user, restore = body.get("server"), body.get("user"), body.get("restore", False)
        if (
            not isinstance(server, str)
            or not (user is None or (isinstance(user, str) and user.strip()))
            or not isinstance(restore, bool)
        ):
            return self._json({"error": usage}, status=400)
        names = [s.name for s in self.service.config.servers]
        if server not in names:
            known = ", ".join(names)
            return self._json(
                {"error": f"no server {server!r}; expected one of {known}"}, status=400
            )
        result = await self.service.accept_reset(server, user, restore=restore)
        if not result["resolved"]:
            who = f" for user {user}" if user else ""
            return self._json({"error": f"nothing is held on {server}{who}"}, status=404)
        return self._json(self._scrub(result))

    # ------------------------------------------------------------------ helpers

    def _authorized(self, request: web.Request) -> bool:
        assert self._token is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    def _json(self, body: Any, status: int = 200) -> web.Response:
        # On one line: an indented body takes json's pure-Python encoder, 2 ms a poll of a
        # busy instance's status, on the event loop that is replicating (`jfsync status
        # --json` prints it indented; so does `| jq`).
        return self._text_json(json.dumps(body), status)

    @staticmethod
    def _text_json(text: str, status: int = 200) -> web.Response:
        return web.Response(
            text=text + "\n",
            status=status,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def _scrubbed_json(self, body: Any) -> web.Response:
        """:meth:`_json` of :meth:`_scrub` of ``body``, without walking it when nothing in it
        needs scrubbing.

        The walk (about a millisecond a poll of a busy instance's status, on the event loop
        that is replicating) changes nothing when no secret occurs in the encoded body (JSON
        escapes each character on its own, so a string holding a secret holds its encoded form)
        and no ``@`` does (a URL has user info only with one): then the encoded body is sent
        as it is. Otherwise the body is walked and encoded again, exactly as before.
        """
        text = self._encode(body)
        if "@" in text or any(s in text for s in self._encoded_secrets):
            return self._json(self._scrub(body))
        return self._text_json(text)

    def _encode(self, body: Any) -> str:
        """``json.dumps(body)``, each activity entry encoded once while it stays the same.

        A busy instance's feed is most of the status (100 entries, 40 KB: 0.4 ms to encode
        on each poll); between two polls a few of them change (a delivery written, a new
        change). The entries' texts are kept by :func:`shown_key` (those of the last build
        only) and put in place of a marker, so the text is exactly ``json.dumps(body)``.
        """
        shown = body.get("activity") if isinstance(body, dict) else None
        if not isinstance(shown, list) or not shown:
            return json.dumps(body)
        kept = self._activity_texts
        texts: dict[tuple[Any, ...], str] = {}
        parts: list[str] = []
        try:
            for entry in shown:
                key = shown_key(entry)
                text = kept.get(key)
                if text is None:
                    text = json.dumps(entry)
                texts[key] = text
                parts.append(text)
        except (KeyError, TypeError):
            return json.dumps(body)  # not the feed's form: encoded as it is
        self._activity_texts = texts
        outline = json.dumps({**body, "activity": self._marker})
        return outline.replace(self._encoded_marker, f"[{', '.join(parts)}]", 1)

    def _scrub(self, value: Any, key: str | None = None) -> Any:
        """Return ``value`` with every secret string replaced and URLs without user info."""
        if isinstance(value, dict):
            return {k: self._scrub(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        if isinstance(value, str):
            if key == "url":
                value = _without_userinfo(value)
            return self._scrub_text(value)
        return value

    def _scrub_text(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def _same_origin(request: web.Request) -> bool:
    """False when a browser says the request comes from a page of another site."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent by a browser page (jfsync's commands, curl)
    parts = urlsplit(origin)
    return origin != "null" and parts.netloc.lower() == request.host.lower()


def _without_userinfo(url: str) -> str:
    """Drop ``user:password@`` from a URL."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
