"""Alerts: notify a person (JSON webhook, ntfy, Gotify) when jfsync needs one, and when it's over.

:class:`Alerter` checks the status snapshot every ``alerts.check_interval`` for incidents:

* ``peer_down``: a server unreachable, or with none of its sockets connected, for longer than
  ``alerts.peer_down_after``;
* ``dead_rows``: writes parked as dead for a peer;
* ``reset_guard``: a user held by the reset guard (until decided), or a restore it did;
* ``auth_failed``: a user's socket that cannot authenticate, or a peer refusing jfsync's key.

Each incident is sent once when it begins and once when it ends (``resolved``); a restore by
the reset guard is a single message. Alerts go through a bounded queue per target and are sent
by that target's own task, retried with backoff (the clock's sleep, so tests inject it);
replication never waits for them. A full queue drops its oldest alert with a warning. Logs
name a target by its ``name`` (or kind and host), never by URL or token; an error from a target
is described by its HTTP status or error type only; every configured secret found in an
alert's text (an error message could quote one) is replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp

from jfsync import __version__
from jfsync.config import AlertsConfig, AlertTarget
from jfsync.tasks import cancel_and_wait
from jfsync.timing import Clock, backoff_delays

logger = logging.getLogger(__name__)

#: Alerts waiting per target; beyond it the oldest is dropped (with a warning).
QUEUE_SIZE = 100
#: Attempts to send one alert to one target before giving up on it (with a warning).
SEND_ATTEMPTS = 6
#: Backoff between attempts.
RETRY_INITIAL_S = 2.0
RETRY_MAX_S = 120.0
#: How long one request to a target may take.
REQUEST_TIMEOUT_S = 15.0

State = Literal["firing", "resolved"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One notification: an incident beginning (``firing``) or ending (``resolved``)."""

    key: str
    event: str
    state: State
    title: str
    message: str
    at_ms: int
    server: str | None = None
    user: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The generic webhook's body."""
        return {
            "source": "jfsync",
            "version": __version__,
            "event": self.event,
            "state": self.state,
            "title": self.title,
            "message": self.message,
            "server": self.server,
            "user": self.user,
            "at_ms": self.at_ms,
        }


@dataclass(frozen=True, slots=True)
class Incident:
    """A condition found in a snapshot (it becomes an alert once it lasted long enough)."""

    key: str
    event: str
    title: str
    message: str
    server: str | None = None
    user: str | None = None
    #: Seconds it must hold before it is sent (peer_down); 0: at once.
    after_s: float = 0.0
    #: A one-off (a restore done): sent once, never resolved.
    single: bool = False


def find_incidents(snap: Mapping[str, Any], config: AlertsConfig) -> list[Incident]:
    """Every incident the snapshot shows, for the events ``config`` asks for."""
    wanted = set(config.events)
    found: list[Incident] = []
    for server in snap.get("servers", []):
        name = str(server["name"])
        users = server.get("users") or []
        outbox = server.get("outbox") or {}
        if "peer_down" in wanted:
            connected = [u for u in users if u.get("state") == "connected"]
            if not server.get("reachable") or (users and not connected):
                why = server.get("last_error") or outbox.get("last_error") or "no live socket"
                found.append(
                    Incident(
                        f"peer_down:{name}",
                        "peer_down",
                        f"jfsync: {name} is unreachable",
                        f"{name} cannot be reached ({why}); {outbox.get('depth', 0)} write(s) "
                        "queued for it are delivered when it returns.",
                        server=name,
                        after_s=config.peer_down_after,
                    )
                )
        dead = int(outbox.get("dead_count") or 0)
        if "dead_rows" in wanted and dead:
            first = (outbox.get("dead") or [{}])[0]
            reason = first.get("reason") or "?"
            found.append(
                Incident(
                    f"dead_rows:{name}",
                    "dead_rows",
                    f"jfsync: {dead} write(s) to {name} parked",
                    f"{dead} write(s) to {name} were refused and parked as dead (first: "
                    f"{first.get('name') or first.get('item', '?')}: {reason}). Fix the cause, "
                    "then retry them on the status page or with `jfsync retry-dead`.",
                    server=name,
                )
            )
        if "auth_failed" in wanted:
            for user in users:
                if user.get("state") == "auth_failed":
                    who = str(user["user"])
                    why = user.get("pause_reason") or user.get("last_error") or "refused"
                    found.append(
                        Incident(
                            f"auth_failed:{name}:{who}",
                            "auth_failed",
                            f"jfsync: {who} cannot sign in on {name}",
                            f"The socket of {who} on {name} cannot authenticate ({why}); "
                            f"nothing of {who} syncs from {name} until it can.",
                            server=name,
                            user=who,
                        )
                    )
            if outbox.get("pause_reason"):
                found.append(
                    Incident(
                        f"auth_failed:{name}:api-key",
                        "auth_failed",
                        f"jfsync: {name} refuses jfsync's API key",
                        f"{name} refused jfsync's API key: {outbox['pause_reason']}. Writes to "
                        "it are paused until the key is fixed.",
                        server=name,
                    )
                )
    if "reset_guard" in wanted:
        guard = snap.get("reset_guard") or {}
        for hold in guard.get("holds", []):
            if hold.get("resolution"):
                continue
            server, user = str(hold["server"]), str(hold["user"])
            found.append(
                Incident(
                    f"reset_guard:{server}:{user}",
                    "reset_guard",
                    f"jfsync: {user} on {server} held by the reset guard",
                    f"{server} shows {hold['items']} of {hold['known']} items of {user} as never "
                    f"touched (lost data?). Nothing syncs from or to {server} for {user} until "
                    "you decide on the status page or with `jfsync accept-reset`.",
                    server=server,
                    user=user,
                )
            )
        for trigger in guard.get("triggers", []):
            if trigger.get("action") != "restored":
                continue
            server, user = str(trigger["server"]), str(trigger["user"])
            found.append(
                Incident(
                    f"reset_guard:{server}:{user}:restored:{trigger['at_ms']}",
                    "reset_guard",
                    f"jfsync: restored {user}'s data on {server}",
                    f"{server} showed {trigger['items']} of {trigger['known']} items of {user} "
                    "as never touched; jfsync did not propagate that and wrote the other "
                    "servers' state back to it.",
                    server=server,
                    user=user,
                    single=True,
                )
            )
    return found


@dataclass(slots=True)
class _Tracked:
    incident: Incident
    since_s: float
    sent: bool = False


@dataclass(slots=True)
class _Target:
    config: AlertTarget
    queue: asyncio.Queue[Alert] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    task: asyncio.Task[None] | None = None
    sent: int = 0
    failed: int = 0
    dropped: int = 0


Snapshot = Callable[[], Awaitable[Mapping[str, Any]]]


class Alerter:
    """Check for incidents every ``check_interval``; send their start and end to every target."""

    def __init__(
        self,
        config: AlertsConfig,
        snapshot: Snapshot,
        clock: Clock,
        *,
        delays: Callable[[], Iterator[float]] | None = None,
        attempts: int = SEND_ATTEMPTS,
        secrets: Iterable[str] = (),
    ) -> None:
        self.config = config
        # Replaced in every alert's text (an error text could quote one), longest first.
        self._secrets = sorted({x for x in secrets if len(x) >= 4}, key=len, reverse=True)
        self._snapshot = snapshot
        self._clock = clock
        self._delays = delays or (lambda: backoff_delays(base_s=RETRY_INITIAL_S, cap_s=RETRY_MAX_S))
        self._attempts = max(1, attempts)
        self._targets = [_Target(t) for t in config.targets]
        self._tracked: dict[str, _Tracked] = {}
        #: One-off incidents already sent (a restore is listed for a while).
        self._singles: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._checker: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """True when there is a target to send to."""
        return bool(self._targets)

    def start(self) -> None:
        """Start checking and the senders (nothing when no target is configured)."""
        if not self.enabled or self._checker is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        )
        for target in self._targets:
            target.task = asyncio.create_task(
                self._send_loop(target), name=f"jfsync-alerts[{target.config.label}]"
            )
        self._checker = asyncio.create_task(self._check_loop(), name="jfsync-alerts-check")
        logger.info(
            "alerts to %s (events: %s; peer down after %.0f s)",
            ", ".join(t.config.label for t in self._targets),
            ", ".join(self.config.events),
            self.config.peer_down_after,
        )

    async def stop(self) -> None:
        """Stop checking and sending (alerts still queued are dropped, and counted in a log)."""
        tasks = [t for t in [self._checker, *(x.task for x in self._targets)] if t is not None]
        self._checker = None
        await cancel_and_wait(tasks, logger)
        for target in self._targets:
            target.task = None
            if not target.queue.empty():
                logger.warning(
                    "alerts: %d alert(s) for %s not sent before the stop",
                    target.queue.qsize(),
                    target.config.label,
                )
        if self._session is not None:
            await self._session.close()
            self._session = None

    def status(self) -> dict[str, Any]:
        """What the alerts do: targets with counts, and the incidents open now."""
        return {
            "targets": [
                {
                    "target": t.config.label,
                    "kind": t.config.kind,
                    "sent": t.sent,
                    "failed": t.failed,
                    "dropped": t.dropped,
                    "queued": t.queue.qsize(),
                }
                for t in self._targets
            ],
            "open": [
                {"key": key, "event": tr.incident.event, "title": tr.incident.title}
                for key, tr in self._tracked.items()
                if tr.sent
            ],
        }

    # ------------------------------------------------------------------ checking

    async def _check_loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # the checker lives on: the next check may work
                logger.exception("alerts: checking for incidents failed")
            await self._clock.sleep(self.config.check_interval)

    async def check(self) -> list[Alert]:
        """Compare the snapshot with the open incidents; queue and return the alerts due."""
        snap = await self._snapshot()
        now_s = self._clock.monotonic()
        now_ms = self._clock.wall_ms()
        alerts: list[Alert] = []
        seen: set[str] = set()
        singles: set[str] = set()
        for incident in find_incidents(snap, self.config):
            if incident.single:
                singles.add(incident.key)
                if incident.key not in self._singles:
                    alerts.append(self._alert(incident, "firing", now_ms))
                continue
            seen.add(incident.key)
            tracked = self._tracked.get(incident.key)
            if tracked is None:
                tracked = self._tracked[incident.key] = _Tracked(incident, now_s)
            tracked.incident = incident
            if not tracked.sent and now_s - tracked.since_s >= incident.after_s:
                tracked.sent = True
                alerts.append(self._alert(incident, "firing", now_ms))
        # Remember the one-offs still listed (and only those: the list is bounded).
        self._singles = singles
        for key in [k for k in self._tracked if k not in seen]:
            tracked = self._tracked.pop(key)
            if tracked.sent:
                alerts.append(self._resolved(tracked.incident, now_ms))
        for alert in alerts:
            self._enqueue(alert)
        return alerts

    @staticmethod
    def _alert(incident: Incident, state: State, now_ms: int) -> Alert:
        return Alert(
            incident.key,
            incident.event,
            state,
            incident.title,
            incident.message,
            now_ms,
            incident.server,
            incident.user,
        )

    @staticmethod
    def _resolved(incident: Incident, now_ms: int) -> Alert:
        endings = {
            "peer_down": "is reachable again; what was queued for it is being delivered.",
            "dead_rows": "has no dead rows any more.",
            "reset_guard": "is no longer held: the hold was decided.",
            "auth_failed": "authenticates again.",
        }
        who = (
            f"{incident.user} on {incident.server}"
            if incident.user is not None and incident.event != "dead_rows"
            else incident.server or "jfsync"
        )
        text = f"{who} {endings.get(incident.event, 'is fine again.')}"
        return Alert(
            incident.key,
            incident.event,
            "resolved",
            f"jfsync: resolved: {incident.title.removeprefix('jfsync: ')}",
            text,
            now_ms,
            incident.server,
            incident.user,
        )

    def _enqueue(self, alert: Alert) -> None:
        for secret in self._secrets:
            if secret in alert.title or secret in alert.message:
                alert = replace(
                    alert,
                    title=alert.title.replace(secret, "***"),
                    message=alert.message.replace(secret, "***"),
                )
        logger.warning("alert (%s): %s", alert.state, alert.title.removeprefix("jfsync: "))
        for target in self._targets:
            if target.queue.full():
                dropped = target.queue.get_nowait()
                target.dropped += 1
                logger.warning(
                    "alerts: the queue for %s is full (it does not answer?); dropped the oldest "
                    "alert: %s",
                    target.config.label,
                    dropped.title,
                )
            target.queue.put_nowait(alert)

    # ------------------------------------------------------------------ sending

    async def _send_loop(self, target: _Target) -> None:
        while True:
            alert = await target.queue.get()
            delays = self._delays()
            for attempt in range(1, self._attempts + 1):
                try:
                    await self._send(target.config, alert)
                except (aiohttp.ClientError, TimeoutError, _Refused) as err:
                    why = _describe(err)
                    if attempt == self._attempts:
                        target.failed += 1
                        logger.warning(
                            "alerts: gave up sending %r to %s after %d attempts: %s",
                            alert.title,
                            target.config.label,
                            attempt,
                            why,
                        )
                        break
                    delay = next(delays)
                    logger.info(
                        "alerts: sending to %s failed (%s); retrying in %.0f s",
                        target.config.label,
                        why,
                        delay,
                    )
                    await self._clock.sleep(delay)
                else:
                    target.sent += 1
                    break

    async def _send(self, target: AlertTarget, alert: Alert) -> None:
        session = self._session
        assert session is not None
        token = target.token.get_secret_value() if target.token is not None else None
        headers: dict[str, str] = {}
        url = target.url
        if target.kind == "ntfy":
            firing = alert.state == "firing"
            headers["Title"] = _header_text(alert.title)
            headers["Priority"] = "high" if firing else "default"
            headers["Tags"] = "warning" if firing else "white_check_mark"
            if token:
                headers["Authorization"] = f"Bearer {token}"
            body: Any = alert.message.encode("utf-8")
            headers["Content-Type"] = "text/plain; charset=utf-8"
            request = session.post(url, data=body, headers=headers)
        elif target.kind == "gotify":
            assert token is not None  # the config requires it
            headers["X-Gotify-Key"] = token
            payload = {
                "title": alert.title,
                "message": alert.message,
                "priority": 8 if alert.state == "firing" else 4,
            }
            request = session.post(url.rstrip("/") + "/message", json=payload, headers=headers)
        else:
            if token:
                headers["Authorization"] = f"Bearer {token}"
            request = session.post(url, json=alert.as_json(), headers=headers)
        async with request as response:
            if response.status >= 300:
                raise _Refused(response.status)


class _Refused(Exception):
    """The target answered with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _describe(err: BaseException) -> str:
    """An error without its text (an aiohttp error's text holds the URL, maybe a secret)."""
    if isinstance(err, _Refused):
        return f"HTTP {err.status}"
    if isinstance(err, TimeoutError):
        return "timed out"
    return type(err).__name__


def _header_text(text: str) -> str:
    """A header value: as is when ASCII, else RFC 2047 encoded (ntfy decodes it)."""
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="
