"""The status page in a real (headless) Chromium, against emulators and a running jfsync.

What a person at the page would see: the token form, one card per server that turns red
within seconds of the server going away (and back when it returns), a dead row with a retry
button that revives it, the activity of a change, and a page that fits a phone in the dark.
The page polls every 200 ms here (``?poll=200``); every wait is on a condition in the page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser.chromium import Browser
from tests.operate.conftest import Stack, StackFactory

pytestmark = pytest.mark.timeout(60)

#: Seconds a person would wait for the page to show a change.
SHOWS_WITHIN_S = 5.0


def _card(server: str) -> str:
    return f'article.card[data-server="{server}"]'


def _card_state(server: str, *fragments: str) -> str:
    """A condition: the server's card says one of ``fragments`` in its state line."""
    text = f"(document.querySelector('{_card(server)} [data-role=state]') || {{}}).textContent"
    return " || ".join(f"({text} || '').includes({fragment!r})" for fragment in fragments)


async def _open(browser: Browser, stack: Stack) -> None:
    await browser.goto(stack.url + "/?poll=200")


async def test_the_token_form_opens_the_page(make_stack: StackFactory, browser: Browser) -> None:
    token = "page-token-5b8e2c91d4"
    stack = await make_stack(token=token)
    await _open(browser, stack)
    await browser.wait_for("!document.getElementById('token-panel').hidden")
    assert await browser.evaluate("document.getElementById('content').hidden") is True
    body = await browser.text("body")
    assert "home" not in body
    assert "cabin" not in body

    await browser.type_into("#token-input", "not-the-token")
    await browser.click("#token-form button[type=submit]")
    await browser.wait_for(
        "document.getElementById('token-reason').textContent.includes('refused')"
    )
    assert await browser.evaluate("document.getElementById('content').hidden") is True

    await browser.type_into("#token-input", token)
    await browser.click("#token-form button[type=submit]")
    await browser.wait_for(f"document.querySelector('{_card('cabin')}')", SHOWS_WITHIN_S)
    assert await browser.evaluate("document.getElementById('token-panel').hidden") is True
    assert "up" in await browser.text(f"{_card('home')} [data-role=state]")
    # Kept for this tab only (unless "remember" was ticked), and never put in the page.
    assert await browser.evaluate("sessionStorage.getItem('jfsync-status-token')") == token
    assert await browser.evaluate("localStorage.getItem('jfsync-status-token')") is None
    assert token not in await browser.evaluate("document.documentElement.outerHTML")


async def test_a_server_going_down_shows_on_its_card_within_seconds(
    make_stack: StackFactory, browser: Browser
) -> None:
    stack = await make_stack()
    await _open(browser, stack)
    await browser.wait_for(_card_state("cabin", "up"), SHOWS_WITHIN_S)

    # Cabin goes away; a change is owed to it: its card turns red, home's stays green.
    await stack.cabin.stop_listener()
    stack.change(stack.home, stack.items[0], is_favorite=True)
    await browser.wait_for(
        _card_state("cabin", "unreachable", "no live connection"), SHOWS_WITHIN_S
    )
    await browser.wait_for(f"document.querySelector('{_card('cabin')}').classList.contains('down')")
    assert "up" in await browser.text(f"{_card('home')} [data-role=state]")
    await browser.wait_for(
        f"document.querySelector('{_card('cabin')} [data-role=depth]').textContent.startsWith('1')",
        SHOWS_WITHIN_S,
    )

    # Cabin returns: the queued change is delivered and the card is green again.
    await stack.cabin.start_listener()
    await browser.wait_for(_card_state("cabin", "up"), 15.0)
    await stack.wait_for(lambda: stack.user_data(stack.cabin, stack.items[0]).favorite)
    await browser.wait_for(
        f"document.querySelector('{_card('cabin')} [data-role=depth]').textContent.startsWith('0')",
        SHOWS_WITHIN_S,
    )
    # The change is in the activity, by name, written to cabin.
    name = stack.home.item(stack.items[0]).name
    await browser.wait_for(
        f"[...document.querySelectorAll('#activity tbody tr')].some(r =>"
        f" r.textContent.includes({name!r}) && r.textContent.includes('home → cabin')"
        " && /cabin \\d+/.test(r.textContent))",
        SHOWS_WITHIN_S,
    )


async def test_the_retry_button_revives_a_dead_row(
    make_stack: StackFactory, browser: Browser
) -> None:
    stack = await make_stack()
    item = stack.items[1]
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, item, rating=9.0)
    await _open(browser, stack)
    await browser.wait_for(f"document.querySelector('{_card('cabin')} [data-role=dead]')", 10.0)
    assert "1 dead row" in await browser.text(f"{_card('cabin')} [data-role=dead]")
    assert "404" in await browser.text(_card("cabin"))
    assert stack.user_data(stack.cabin, item).rating != 9.0

    await browser.click(f"{_card('cabin')} button[data-action=retry-dead]")
    await browser.wait_for(
        "document.getElementById('message').textContent.includes('1 dead row revived')"
    )
    await stack.wait_for(lambda: stack.user_data(stack.cabin, item).rating == 9.0)
    await browser.wait_for(
        f"!document.querySelector('{_card('cabin')} [data-role=dead]')", SHOWS_WITHIN_S
    )


async def test_the_page_fits_a_phone_and_follows_dark_mode(
    make_stack: StackFactory, browser: Browser, tmp_path: Path
) -> None:
    stack = await make_stack()
    await stack.flow(stack.home, stack.items[2], played=True)
    await _open(browser, stack)
    await browser.wait_for("document.querySelectorAll('#activity tbody tr').length > 0")

    light = await browser.evaluate("getComputedStyle(document.body).backgroundColor")
    await browser.dark(True)
    dark = await browser.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark

    await browser.resize(390, 844, mobile=True)
    await browser.wait_for("window.innerWidth === 390")
    overflow = await browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone"
    cards = await browser.evaluate(
        "[...document.querySelectorAll('article.card')].map(c => c.getBoundingClientRect().width)"
    )
    assert len(cards) == 2
    assert all(width <= 390 for width in cards)

    shot = tmp_path / "phone-dark.png"
    png = await browser.screenshot(shot)
    assert png.startswith(b"\x89PNG")


async def test_screenshot_for_the_docs(
    make_stack: StackFactory, browser: Browser, tmp_path: Path
) -> None:
    """A page with something on it: a change flowed, a dead row parked, a server away.

    Saved to ``$JFSYNC_SCREENSHOT`` when set (how docs/status-page.png is made), else to a
    temporary file.
    """
    stack = await make_stack()
    await stack.flow(stack.home, stack.items[3], is_favorite=True)
    await stack.flow(stack.cabin, stack.items[4], played=True)
    stack.cabin.fail_next_writes(1, 404)
    stack.change(stack.home, stack.items[5], rating=6.0)

    async def parked() -> bool:
        return len(await stack.service.ledger.dead_rows("cabin")) == 1

    await stack.wait_for(parked)
    await _open(browser, stack)
    await browser.wait_for(f"document.querySelector('{_card('cabin')} [data-role=dead]')", 10.0)
    await browser.wait_for("document.querySelectorAll('#activity tbody tr').length >= 3")
    target = Path(os.environ.get("JFSYNC_SCREENSHOT") or tmp_path / "status-page.png")
    png = await browser.screenshot(target)
    assert png.startswith(b"\x89PNG")
    assert len(png) > 10_000


async def test_accepting_a_reset_hold_on_the_page_takes_that_servers_state(
    make_stack: StackFactory, browser: Browser
) -> None:
    stack = await make_stack(config_extra={"sync": {"shutdown_grace": 2, "reset_guard": "hold"}})
    liked = stack.items[:6]
    for item in liked:
        await stack.flow(stack.home, item, is_favorite=True)
    # Cabin comes back with alice's data gone (a reinstall): jfsync holds her there.
    await stack.cabin.stop_listener()
    stack.cabin.wipe_user_data(stack.cabin.user_id("alice"))
    await stack.cabin.start_listener()

    async def held() -> bool:
        snap = await stack.service.status()
        return [(h["server"], h["user"]) for h in snap["reset_guard"]["holds"]] == [
            ("cabin", "alice")
        ]

    await stack.wait_for(held)
    await _open(browser, stack)
    hold = '#holds li[data-hold="cabin/alice"]'
    await browser.wait_for(f"document.querySelector('{hold} button[data-action=accept]')")
    assert "held by the reset guard" in await browser.text("#problem-list")
    assert all(stack.user_data(stack.home, item).favorite for item in liked)

    await browser.click(f"{hold} button[data-action=accept]")
    await browser.wait_for("document.getElementById('message').textContent.includes('cabin')")
    assert browser.dialogs == ["Take the state of cabin for alice?"]
    # Cabin's state is alice's now, on every server; the hold is gone from the page.
    await stack.wait_for(
        lambda: not any(stack.user_data(stack.home, item).favorite for item in liked)
    )
    await browser.wait_for("document.getElementById('holds-section').hidden", SHOWS_WITHIN_S)
