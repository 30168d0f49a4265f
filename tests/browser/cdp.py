"""Just enough of the Chrome DevTools Protocol to drive a headless chromium from a test.

One ``Browser`` process per test module (``start_chromium``); each test connects
with ``CDP.connect`` and opens its own ``Page`` (a target attached with flat
sessions). Waits on the page run inside the browser and are bounded there and here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

INSTALL_SCRIPT = Path(__file__).with_name("install-chromium.sh")

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests may run as root, where chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
]


class CDPError(Exception):
    pass


def find_or_install_chromium() -> tuple[str | None, str]:
    """The chromium executable (installing Debian's package when missing), or a reason."""
    found = shutil.which("chromium")
    if found:
        return found, ""
    if os.environ.get("RELAYD_TEST_NO_INSTALL"):
        return None, "chromium is not installed (RELAYD_TEST_NO_INSTALL is set)"
    try:
        result = subprocess.run(
            [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot install chromium: {exc}"
    found = shutil.which("chromium")
    if result.returncode != 0 or found is None:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        return None, f"cannot install chromium: {lines[-1]}"
    return found, ""


@dataclass
class Browser:
    proc: subprocess.Popen[bytes]
    ws_url: str
    log: Path

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_chromium(executable: str, workdir: Path, timeout: float) -> Browser:
    """Start chromium and read its DevTools endpoint from the DevToolsActivePort file."""
    profile = workdir / "profile"
    profile.mkdir()
    log = workdir / "chromium.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    # chromium announces its port only through this file (or its log): poll, bounded.
    while True:
        lines = active.read_text().split("\n") if active.exists() else []
        if len(lines) >= 2 and lines[0].isdigit() and lines[1].startswith("/devtools/"):
            return Browser(proc, f"ws://127.0.0.1:{lines[0]}{lines[1]}", log)
        if proc.poll() is not None or time.monotonic() > deadline:
            Browser(proc, "", log).close()
            raise RuntimeError(f"chromium did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


@dataclass
class CDP:
    """One DevTools connection to the browser; commands by id, events to waiters."""

    ws: ClientConnection
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[CDP]:
        async with connect(url, max_size=None, ping_interval=None) as ws:
            cdp = cls(ws)
            cdp._reader = asyncio.create_task(cdp._read())
            try:
                yield cdp
            finally:
                cdp._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cdp._reader

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(CDPError(message["error"].get("message")))
                    else:
                        future.set_result(message.get("result", {}))
                else:
                    self.events.append(message)
                    self._changed.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self.ws.send(json.dumps(message))
        return await future

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, *, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` on that ``predicate`` accepts."""
        async with asyncio.timeout(timeout):
            seen = start
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                self._changed.clear()
                await self._changed.wait()

    @contextlib.asynccontextmanager
    async def page(self, width: int = 1100, height: int = 800) -> AsyncIterator[Page]:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, attached["sessionId"])
        try:
            for domain in ("Page", "Runtime", "Network"):
                await page.send(f"{domain}.enable")
            await page.send("Page.bringToFront")
            await page.viewport(width, height)
            # Record CSP violations from the first moment of every document.
            await page.send(
                "Page.addScriptToEvaluateOnNewDocument",
                {
                    "source": "window.__violations = [];"
                    "document.addEventListener('securitypolicyviolation',"
                    " (e) => window.__violations.push(e.violatedDirective));"
                },
            )
            yield page
        finally:
            await self.send("Target.closeTarget", {"targetId": target})


@dataclass
class Page:
    cdp: CDP
    session: str

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, self.session)

    def events(self, method: str) -> list[dict[str, Any]]:
        return [
            e["params"]
            for e in self.cdp.events
            if e.get("sessionId") == self.session and e["method"] == method
        ]

    async def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def navigate(self, url: str, timeout: float) -> None:
        await self._load("Page.navigate", {"url": url}, timeout)

    async def reload(self, timeout: float) -> None:
        await self._load("Page.reload", {}, timeout)

    async def _load(self, method: str, params: dict[str, Any], timeout: float) -> None:
        start = len(self.cdp.events)
        await self.send(method, params)
        await self.cdp.wait_event(
            lambda e: e.get("sessionId") == self.session and e["method"] == "Page.loadEventFired",
            timeout,
            start=start,
        )

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{text}\n--- page text ---\n{await self.body_text()}")
        return result["result"].get("value")

    async def body_text(self) -> str:
        result = await self.send(
            "Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True}
        )
        return str(result["result"].get("value"))

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Wait until the JavaScript ``expression`` is truthy in the page; return its value."""
        ms = int(timeout * 1000)
        script = f"""new Promise((resolve, reject) => {{
            const deadline = performance.now() + {ms};
            const check = () => {{
                let value;
                try {{ value = ({expression}); }} catch (e) {{ value = undefined; }}
                if (value) return resolve(value);
                if (performance.now() > deadline) {{
                    return reject(new Error("timed out after {ms} ms waiting for: "
                        + {json.dumps(expression)}));
                }}
                setTimeout(check, 10);
            }};
            check();
        }})"""
        async with asyncio.timeout(timeout + 5):
            return await self.evaluate(script)

    async def type_text(self, text: str) -> None:
        await self.send("Input.insertText", {"text": text})

    async def press(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            params: dict[str, Any] = {
                "type": kind,
                "key": key,
                "code": code,
                "windowsVirtualKeyCode": key_code,
            }
            if kind == "keyDown" and key == "Enter":
                params["text"] = "\r"
            await self.send("Input.dispatchKeyEvent", params)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        write_file(path, base64.b64decode(shot["data"]))


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
