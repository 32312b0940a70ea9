"""Headless Chromium driven over the Chrome DevTools Protocol, with the ``websockets`` package.

:func:`find_chromium` locates Debian's ``chromium`` (``JFSYNC_CHROMIUM`` overrides);
:class:`Browser` starts it headless with a fresh profile on a free debugging port, opens one
page and offers what the tests need: navigate, evaluate JavaScript, wait until a condition on
the page holds (a ``MutationObserver`` in the page resolves a promise: no polling, no sleeps),
click, type, answer ``confirm()`` dialogs and take screenshots. Everything is closed and the
process ended at exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import websockets

#: Flags for a headless, quiet, throwaway Chromium (``--no-sandbox``: tests run as root).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
)
#: How long Chromium may take to print its DevTools address.
START_TIMEOUT_S = 30.0


def find_chromium() -> str | None:
    """The Chromium binary to use, or None when none is installed."""
    override = os.environ.get("JFSYNC_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(Exception):
    """Chromium failed or a page expression threw."""


class Browser:
    """One headless Chromium with one page (use ``async with``)."""

    def __init__(self, binary: str, *, width: int = 1200, height: int = 900) -> None:
        self._binary = binary
        self._width = width
        self._height = height
        self._profile = tempfile.TemporaryDirectory(prefix="jfsync-chromium-")
        self._process: asyncio.subprocess.Process | None = None
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._session: str | None = None
        #: Texts of the confirm() dialogs answered (accepted) so far.
        self.dialogs: list[str] = []
        #: Exceptions thrown by the page's scripts (a test asserts there are none).
        self.page_errors: list[str] = []

    async def __aenter__(self) -> Browser:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            self._binary,
            *FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={self._width},{self._height}",
            "--remote-debugging-port=0",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        url = await self._devtools_url()
        self._ws = await websockets.connect(url, max_size=64 * 1024 * 1024)
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")
        target = await self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = await self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self._session = attached["sessionId"]
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self._width, "height": self._height, "deviceScaleFactor": 1, "mobile": False},
        )

    async def _devtools_url(self) -> str:
        assert self._process is not None
        assert self._process.stderr is not None
        stderr = self._process.stderr
        seen: list[str] = []
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await stderr.readline()).decode("utf-8", "replace")
                if not line:
                    raise BrowserError("chromium exited at start: " + "".join(seen[-10:]))
                seen.append(line)
                if "DevTools listening on " in line:
                    url = line.split("DevTools listening on ", 1)[1].strip()
                    # Keep draining stderr so Chromium never blocks on a full pipe.
                    self._drain = asyncio.create_task(_drain(stderr), name="cdp-stderr")
                    return url

    async def _read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            method = message.get("method")
            params = message.get("params", {})
            if method == "Page.javascriptDialogOpening":
                self.dialogs.append(params.get("message", ""))
                asyncio.get_running_loop().create_task(
                    self.send("Page.handleJavaScriptDialog", {"accept": True})
                )
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                exception = details.get("exception", {})
                self.page_errors.append(exception.get("description") or details.get("text", "?"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send(json.dumps(message))
        async with asyncio.timeout(START_TIMEOUT_S):
            answer = await future
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def goto(self, url: str) -> None:
        """Open ``url`` and wait until its document has loaded."""
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, condition: str, timeout_s: float = 10.0) -> None:
        """Wait until the JavaScript ``condition`` holds, re-checked on every DOM change."""
        script = (
            "new Promise((resolve) => {"
            f" const check = () => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }};"
            " if (check()) { resolve(true); return; }"
            " const done = () => { if (check()) { observer.disconnect(); clearInterval(t); resolve(true); } };"
            " const observer = new MutationObserver(done);"
            " observer.observe(document, {subtree: true, childList: true, attributes: true, characterData: true});"
            # The document itself may be replaced (a navigation): check on a slow beat too.
            " const t = setInterval(done, 250);"
            "})"
        )
        try:
            async with asyncio.timeout(timeout_s):
                await self.evaluate(script)
        except TimeoutError:
            body = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(
                f"the page did not show {condition!r} within {timeout_s} s; it shows:\n{body}"
            ) from None

    async def text(self, selector: str) -> str:
        """The visible text of the first element matching ``selector`` ('' when none)."""
        value = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText"
        )
        return str(value)

    async def click(self, selector: str) -> None:
        """Click the first element matching ``selector``."""
        ok = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        if not ok:
            raise AssertionError(f"nothing to click at {selector!r}")

    async def type_into(self, selector: str, value: str) -> None:
        """Set the value of the input matching ``selector`` as typing would."""
        await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" e.focus(); e.value = {json.dumps(value)};"
            " e.dispatchEvent(new Event('input', {bubbles: true})); })()"
        )

    async def resize(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Show the page at ``width`` x ``height`` CSS pixels (``mobile``: a phone)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def dark(self, enabled: bool) -> None:
        """Make the page see ``prefers-color-scheme: dark`` (or light)."""
        scheme = "dark" if enabled else "light"
        await self.send(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
        )

    async def screenshot(self, path: Path, *, full_page: bool = True) -> bytes:
        """Save a PNG of the page (the whole page by default) and return it."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = await self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
            params["captureBeyondViewport"] = True
        result = await self.send("Page.captureScreenshot", params)
        data = base64.b64decode(result["data"])
        await asyncio.to_thread(path.write_bytes, data)
        return data

    async def close(self) -> None:
        """Close the page and the browser; end the process."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.send("Browser.close", session=False)
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        for future in self._waiting.values():
            future.cancel()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        drain = self._drain
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(BaseException):
                await drain
        self._profile.cleanup()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
