"""No secret reaches any output: logs (DEBUG included), /status, /metrics, ``jfsync status``, errors.

One scenario with known secret strings (both API keys, a configured user token, user
passwords, the status token, and every token the emulators mint for jfsync) runs changes both
ways, a peer that fails with 500s and recovers, a 400 that parks a row, a 401 that pauses a
peer, a configured token revoked under a live socket, requests to the status endpoint with
wrong or missing tokens, and configs with mistakes next to secrets, with jfsync's own log
handler installed at DEBUG. Every output is then searched for every secret: answers, printed
output, error messages and reprs, jfsync's log records before scrubbing, and what the log
handler printed (which includes the libraries' DEBUG records, after the scrubber).
"""

from __future__ import annotations

import asyncio
import io
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from jfsync.config import parse_config
from jfsync.emulator import Emulator
from jfsync.emulator.server import Emulator as EmulatorClass
from jfsync.errors import ConfigError
from jfsync.logs import CHATTY_LIBRARIES, configure_logging
from jfsync.ops import statuscmd
from tests.operate.conftest import KEYS, Stack, StackFactory

pytestmark = pytest.mark.timeout(45)

STATUS_TOKEN = "st-9c4e1f7a2b6d3e8f"
PASSWORDS = {"alice": "pw-alice-Qx7!vR2#kL", "bob": "pw-bob-Zt4$mN8&hJ"}
#: The fake servers' own logs record what clients sent them; they are not jfsync's output.
FOREIGN_LOGGERS = ("jfsync.emulator", "aiohttp.access", "aiohttp.server", "aiohttp.web")


def _record_text(record: logging.LogRecord) -> str:
    text = f"{record.name} {record.levelname} {record.getMessage()}"
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    if record.stack_info:
        text += "\n" + record.stack_info
    return text


async def _wait_state(stack: Stack, server: str, user: str, state: str) -> None:
    def there() -> bool:
        subs = [s for s in stack.service.links[server].subscribers.values() if s.user_name == user]
        return bool(subs) and str(subs[0].status.state) == state

    await stack.wait_for(there)


@dataclass
class Run:
    """What one run of the scenario produced."""

    secrets: dict[str, str]
    #: Answers, printed output, error messages and reprs.
    outputs: list[str]
    #: Records of jfsync's own loggers, before any scrubbing.
    jfsync_logs: list[str]
    #: What ``jfsync run`` would print: stderr of configure_logging("debug") with the scrubber.
    stderr: str


@pytest.fixture
def production_logging() -> Iterator[None]:
    """Install jfsync's own log handler (stderr, scrubber) at DEBUG; remove it afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    libraries = {name: logging.getLogger(name).level for name in CHATTY_LIBRARIES}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


async def _run_scenario(
    make_stack: StackFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Run:
    capsys.readouterr()
    caplog.set_level(logging.DEBUG)
    minted: list[str] = []
    original_login = EmulatorClass.login

    def recording_login(self: Emulator, *args: Any, **kwargs: Any) -> Any:
        access = original_login(self, *args, **kwargs)
        minted.append(access.token)
        return access

    monkeypatch.setattr(EmulatorClass, "login", recording_login)
    configured: dict[str, str] = {}

    def credentials(emus: dict[str, Emulator]) -> dict[str, dict[str, Any]]:
        configured["alice"] = emus["home"].user_token("alice")
        return {
            "home": {"users": {"alice": {"token": configured["alice"]}}},
            "cabin": {"users": {"bob": {"password": PASSWORDS["bob"]}}},
        }

    stack = await make_stack(
        token=STATUS_TOKEN,
        users=list(PASSWORDS.items()),
        server_extra=credentials,
        before_start=lambda config: configure_logging("debug", config.secret_values()),
    )
    outputs: list[str] = []
    items = stack.items

    # Changes flow both ways, for a user with a configured token and one with a password.
    await stack.flow(stack.home, items[0], is_favorite=True)
    await stack.flow(stack.cabin, items[1], played=True, play_count=2)
    bob = {"user": "bob"}
    expected = stack.change(stack.cabin, items[2], rating=8.0, **bob)
    await stack.wait_for(lambda: stack.user_data(stack.home, items[2], **bob) == expected)

    # A failing peer: three 500s make cabin "down"; it is probed and drained.
    stack.cabin.fail_next_writes(3, 500)
    await stack.flow(stack.home, items[3], rating=6.0)
    # A bad request: cabin answers 400 and the row is parked as dead.
    stack.cabin.fail_next_writes(1, 400)
    stack.change(stack.home, items[4], is_favorite=True)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)
    # A refused key: home answers 401 to a write and is paused.
    stack.home.fail_next_writes(1, 401)
    stack.change(stack.cabin, items[5], is_favorite=True)

    async def paused() -> bool:
        return stack.service.links["home"].pusher.stats.pause_reason is not None

    await stack.wait_for(paused)
    # The configured token is revoked under a live socket: the refresh fails visibly.
    stack.home.revoke_token(configured["alice"])
    await stack.home.drop_sockets()
    await _wait_state(stack, "home", "alice", "auth_failed")

    # The status endpoint, with the right, a wrong, and no token.
    for path in ("/status", "/metrics", "/healthz", "/nope"):
        for sent in (True, False, "Bearer-wrong", STATUS_TOKEN[:-2]):
            status, text = await stack.get(path, token=sent)
            outputs.append(f"{path} {status} {text}")
    status_body = next(o for o in outputs if o.startswith("/status 200"))
    # `jfsync status`, table and JSON, with the token, a wrong one, and none.
    printed: dict[tuple[str | None, bool], str] = {}
    for token in (STATUS_TOKEN, "wrong-token", None):
        for raw in (False, True):
            out = io.StringIO()
            await asyncio.to_thread(
                statuscmd.show_status, stack.url, token, timeout_s=5, raw=raw, out=out
            )
            printed[(token, raw)] = out.getvalue()
        out = io.StringIO()
        await asyncio.to_thread(statuscmd.check_health, stack.url, token, timeout_s=5, out=out)
        outputs.append(out.getvalue())
    outputs += printed.values()
    table = printed[(STATUS_TOKEN, False)]
    # Error messages and reprs the service holds.
    service = stack.service
    for link in service.links.values():
        outputs += [str(link.last_error), str(link.pusher.stats), repr(link.pusher)]
        outputs += [repr(link.client), repr(link.tokens), repr(link.config)]
        for sub in link.subscribers.values():
            outputs += [repr(sub.status), repr(sub)]
    outputs += [repr(service.config), str(service.config), repr(stack.server), repr(service.ledger)]
    # Config mistakes next to secrets.
    for text in (
        f"servers:\n  - {{name: a, url: 'http://a', api_key: {KEYS['home']}, bogus: 1}}\n"
        f"  - {{name: b, url: 'ftp://b', api_key: {KEYS['cabin']}}}\n",
        f"servers:\n  - {{name: a, url: 'http://a', api_key: [{KEYS['home']}]}}\n"
        "  - name: b\n    url: http://b\n    api_key: x\n    users:\n"
        f"      alice: {{token: {configured['alice']}, password: '{PASSWORDS['alice']}'}}\n"
        f"status: {{listen: 'nowhere', token: {{nested: {STATUS_TOKEN}}}}}\n",
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        outputs.append(str(caught.value))
    records = [r for r in caplog.records if not r.name.startswith(FOREIGN_LOGGERS)]

    # The scenario did what it says, so the searches are not vacuous.
    assert any(r.levelno == logging.DEBUG for r in records)
    assert "HTTP 401" in status_body
    assert "HTTP 400" in status_body
    assert "auth_failed" in status_body
    assert "ERROR peer home is paused" in table
    assert "dead row" in table
    assert any(o.startswith("/metrics 401") for o in outputs)
    assert len(minted) >= 4, minted
    stderr = capsys.readouterr().err
    assert "DEBUG" in stderr
    assert "[→home]" in stderr

    secrets = {
        "API key home": KEYS["home"],
        "API key cabin": KEYS["cabin"],
        "configured token": configured["alice"],
        "status token": STATUS_TOKEN,
        **{f"password {user}": pw for user, pw in PASSWORDS.items()},
        **{f"minted token {i}": token for i, token in enumerate(minted)},
    }
    return Run(
        secrets=secrets,
        outputs=outputs,
        jfsync_logs=[_record_text(r) for r in records if r.name.startswith("jfsync")],
        stderr=stderr,
    )


def _leaks(run: Run, where: str, texts: list[str]) -> list[str]:
    return [
        f"{name} in {where}: {text[:300]!r}"
        for text in texts
        for name, secret in run.secrets.items()
        if secret in text
    ]


@pytest.mark.usefixtures("production_logging")
async def test_no_secret_in_answers_messages_or_jfsync_logs(
    make_stack: StackFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = await _run_scenario(make_stack, caplog, capsys, monkeypatch)
    leaks = _leaks(run, "outputs", run.outputs) + _leaks(run, "jfsync logs", run.jfsync_logs)
    assert not leaks, "\n".join(leaks)


@pytest.mark.usefixtures("production_logging")
async def test_no_secret_in_debug_logs_as_jfsync_run_prints_them(
    make_stack: StackFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = await _run_scenario(make_stack, caplog, capsys, monkeypatch)
    leaks = _leaks(run, "stderr", run.stderr.splitlines())
    assert not leaks, "\n".join(leaks)
