"""The status page's routes over HTTP: its files load without the token but hold no data, every
data route still needs the token, a POST from another site is refused, and the files ship in
the package. (What the page shows is tested in a real browser: tests/browser.)"""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from jfsync.ops.status import PAGE_FILES
from tests.operate.conftest import KEYS, StackFactory

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "page-route-token-3c9a1e"


async def test_the_page_loads_without_the_token_and_holds_no_data(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(token=TOKEN, connect=False)
    for path in PAGE_FILES:
        async with stack.http.get(stack.url + path) as response:
            body = await response.text()
            assert response.status == 200, path
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Frame-Options"] == "DENY"
        for secret in (TOKEN, *KEYS.values(), "home", "cabin", stack.home.url):
            assert secret not in body, (path, secret)
    async with stack.http.get(stack.url + "/") as response:
        assert response.content_type == "text/html"
        html = await response.text()
    # Nothing is loaded from elsewhere: every script and stylesheet is the server's own.
    assert "http://" not in html
    assert "https://" not in html
    assert 'src="page/app.js"' in html

    for path in ("/status", "/page/other.js", "/page/", "/index.html"):
        status, text = await stack.get(path, token=False)
        assert status == 401, path
        assert TOKEN not in text


async def test_a_post_from_another_site_is_refused(make_stack: StackFactory) -> None:
    stack = await make_stack(token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with stack.http.post(
        stack.url + "/retry-dead", headers={**auth, "Origin": "https://evil.example"}
    ) as response:
        assert response.status == 403
    async with stack.http.post(
        stack.url + "/retry-dead", headers={**auth, "Origin": stack.url}
    ) as response:
        assert response.status == 200
        assert (await response.json())["revived"] == {"home": 0, "cabin": 0}


def test_the_page_files_ship_in_the_wheel() -> None:
    """pyproject's package data covers every file of jfsync/ops/page (no build step)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["jfsync.ops"]
    page = ROOT / "jfsync" / "ops" / "page"
    files = sorted(p.relative_to(page.parent).as_posix() for p in page.iterdir() if p.is_file())
    assert files
    for name in files:
        assert any(fnmatch(name, pattern) for pattern in patterns), name
    served = {name for name, _ in PAGE_FILES.values()}
    assert served == {Path(f).name for f in files}
