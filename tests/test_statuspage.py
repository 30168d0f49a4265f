"""The status page: its HTTP routes, then the page itself in a real headless chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException, Request

from relayd import __version__, statuspage
from tests.browser.cdp import CDP, Browser, Page, find_or_install_chromium, start_chromium
from tests.conftest import MS, NotifySocket, free_port, run_daemon, send_device, wait_until

pytestmark = pytest.mark.anyio


async def test_page_and_static_files(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d, httpx.AsyncClient(base_url=d.url) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "connect-src 'self' ws: wss:" in csp
        assert "form-action 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-cache"
        assert page.content == (files("relayd") / "static" / "index.html").read_bytes()
        for name, media in [
            ("index.html", "text/html"),
            ("status.js", "text/javascript"),
            ("status.css", "text/css"),
        ]:
            r = await http.get(f"/static/{name}")
            assert r.status_code == 200
            assert r.headers["content-type"] == f"{media}; charset=utf-8"
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-content-type-options"] == "nosniff"
        for name in ["nope.js", "..%2Fstatuspage.py", "__init__.py", ""]:
            assert (await http.get(f"/static/{name}")).status_code == 404, name
        assert (await http.get("/static/../app.py")).status_code == 404


def test_static_files_are_small_and_have_no_inline_code() -> None:
    static = files("relayd") / "static"
    sizes = {name: len((static / name).read_bytes()) for name in statuspage.STATIC_FILES}
    assert sum(sizes.values()) < 100_000, sizes

    class Check(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.problems: list[str] = []
            self.scripts: list[str] = []
            self.in_script = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            names = dict(attrs)
            for attr, value in attrs:
                if attr.startswith("on") or attr == "style":
                    self.problems.append(f"{tag} {attr}")
                if value and ("http://" in value or "https://" in value or value.startswith("//")):
                    self.problems.append(f"external {tag} {attr}={value}")
            if tag == "script":
                self.in_script = True
                self.scripts.append(names.get("src") or "")
            if tag == "style":
                self.problems.append("inline <style>")

        def handle_endtag(self, tag: str) -> None:
            self.in_script = False

        def handle_data(self, data: str) -> None:
            if self.in_script and data.strip():
                self.problems.append("inline script")

    check = Check()
    check.feed((static / "index.html").read_text())
    assert check.problems == []
    assert check.scripts == ["/static/status.js"]
    script = (static / "status.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "localStorage" not in script and "document.cookie" not in script
    assert "eval(" not in script


async def test_status_json(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d, httpx.AsyncClient(base_url=d.url) as http:
        first, second = sorted(d.ports)
        await send_device(first, b"one\ntwo\n")
        await wait_until(lambda: d.runtime.registry.get(first).messages_received == 2)
        r = await http.get("/status.json")
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-content-type-options"] == "nosniff"
        body = r.json()
        assert set(body) == {"version", "uptime_s", "state", "ws_clients", "ports"}
        assert body["state"] == "ready"
        assert body["ws_clients"] == 0
        assert body["ports"] == [
            {
                "port": first,
                "name": f"dev-{first}",
                "kind": "listen",
                "state": "listening",
                "connections": 0,
                "messages_received": 2,
                "bytes_received": 8,
            },
            {
                "port": second,
                "name": f"dev-{second}",
                "kind": "listen",
                "state": "listening",
                "connections": 0,
                "messages_received": 0,
                "bytes_received": 0,
            },
        ]


async def test_status_json_shows_only_visible_ports(
    tmp_path: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_daemon(tmp_path, notify) as d, httpx.AsyncClient(base_url=d.url) as http:
        second = max(d.ports)
        monkeypatch.setattr(statuspage, "visible_ports", lambda request: {second, 1})
        body = (await http.get("/status.json")).json()
        assert [p["port"] for p in body["ports"]] == [second]
        monkeypatch.setattr(statuspage, "visible_ports", require_token("secret"))
        refused = await http.get("/status.json")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        allowed = await http.get("/status.json", headers={"Authorization": "Bearer secret"})
        assert allowed.status_code == 200


def require_token(token: str) -> Callable[[Request], set[int] | None]:
    """A stand-in for token mode: 401 unless ``Authorization: Bearer <token>``; then all ports."""

    def visible_ports(request: Request) -> set[int] | None:
        if request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(401, "a valid token is required", {"WWW-Authenticate": "Bearer"})
        return None

    return visible_ports


# The page in a real browser: Debian's chromium, driven over the DevTools protocol.

LOAD = 10_000 * MS  # a page load, a first poll
POLL = 6_000 * MS  # two polls of /status.json (every 2 s) and a margin
LIVE = "document.getElementById('tail-state').textContent === 'live'"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable, reason = find_or_install_chromium()
    if executable is None:
        if os.environ.get("RELAYD_TEST_REQUIRE_CHROMIUM"):  # CI: a skip would hide it
            pytest.fail(reason)
        pytest.skip(reason)
    started = start_chromium(executable, tmp_path_factory.mktemp("chromium"), timeout=LOAD)
    yield started
    started.close()


@contextlib.asynccontextmanager
async def open_page(
    browser: Browser, url: str, *, width: int = 1100, height: int = 760
) -> AsyncIterator[Page]:
    async with CDP.connect(browser.ws_url) as cdp, cdp.page(width, height) as page:
        await page.navigate(url, LOAD)
        assert await page.evaluate("document.visibilityState") == "visible"
        yield page
        errors = page.events("Runtime.exceptionThrown")
        assert errors == [], errors
        assert await page.evaluate("window.__violations") == []


def tail_lines() -> str:
    return "Array.from(document.querySelectorAll('#tail li .data'), (e) => e.textContent)"


def tail_has(text: str) -> str:
    return f"{tail_lines()}.includes({json.dumps(text)})"


def cell(port: int, column: str) -> str:
    return f"document.querySelector('#ports-body tr[data-port=\"{port}\"] .{column}')"


def browser_test(test: Callable[..., Any]) -> Callable[..., Any]:
    """The first one may install chromium; all of them share one worker's browser."""
    marked: Callable[..., Any] = pytest.mark.xdist_group("browser")(pytest.mark.timeout(900)(test))
    return marked


@browser_test
async def test_browser_ports_tail_counts_and_escaping(
    tmp_path: Path, notify: NotifySocket, browser: Browser
) -> None:
    async with run_daemon(tmp_path, notify) as d, open_page(browser, d.url + "/") as page:
        first, second = sorted(d.ports)
        rows = "Array.from(document.querySelectorAll('#ports-body tr'), (r) => r.dataset.port)"
        await page.wait_for(f"{rows}.join(',') === '{first},{second}'", LOAD)
        assert await page.evaluate(f"{cell(first, 'name')}.textContent") == f"dev-{first}"
        assert await page.evaluate(f"{cell(first, 'kind')}.textContent") == "listen"
        assert await page.evaluate(f"{cell(first, 'state')}.textContent") == "listening"
        assert await page.evaluate("document.getElementById('version').textContent") == (
            __version__
        )
        # The page's own WebSocket is open (and counted) before devices send.
        await page.wait_for(LIVE, LOAD)
        await page.wait_for("document.getElementById('clients').textContent === '1'", POLL)

        device = await send_device(first, b"hello from the scale\n", close=False)
        try:
            # A device's line shows up in the tail within a second.
            await page.wait_for(tail_has("hello from the scale"), 1000 * MS)
            # Counters: a connection, then messages and a rate from counter deltas.
            await page.wait_for(f"{cell(first, 'connections')}.textContent === '1'", POLL)
            loop = asyncio.get_running_loop()
            for i in range(20):
                await loop.sock_sendall(device, f"reading {i} 12.5 kg\n".encode())
            await page.wait_for(f"{cell(first, 'mps')}.textContent.includes('21 total')", POLL)
            rate = f"parseFloat({cell(first, 'mps .value')}.textContent)"
            await page.wait_for(f"{rate} > 0", POLL)
            points = f"{cell(first, 'mps polyline')}.getAttribute('points')"
            await page.wait_for(f"{points}.split(' ').length >= 2", POLL)

            # Device data is text, never markup; no script runs.
            hostile = [
                "<script>window.__pwned = 1</script>",
                '<img src=x onerror="window.__pwned = 2">',
                "<b>bold?</b> &amp; \u202eevil",
            ]
            await loop.sock_sendall(device, "".join(h + "\n" for h in hostile).encode())
            await loop.sock_sendall(device, b"\xff\xfe binary\n")
            await page.wait_for(tail_has(hostile[0]), 1000 * MS)
            await page.wait_for(tail_has(hostile[1]), 1000 * MS)
            await page.wait_for(tail_has("<b>bold?</b> &amp; \\u202eevil"), 1000 * MS)
            await page.wait_for(f"{tail_lines()}.some((t) => t.startsWith('(binary'))", 1000 * MS)
            tail_markup = "document.querySelectorAll('#tail script, #tail img, #tail b').length"
            assert await page.evaluate(tail_markup) == 0
            assert await page.evaluate("document.querySelectorAll('img').length") == 0
            assert await page.evaluate("typeof window.__pwned") == "undefined"

            await page.screenshot(tmp_path / "status-page.png")

            # The port filter subscribes to that port only.
            await page.evaluate(
                "(() => { const s = document.getElementById('port-filter');"
                f" s.value = '{second}'; s.dispatchEvent(new Event('change')); }})()"
            )
            assert await page.evaluate(f"{tail_lines()}.length") == 0  # first's lines went
            await page.wait_for(
                "document.getElementById('tail-state').textContent === 'live'", LOAD
            )
            await loop.sock_sendall(device, b"not for this filter\n")
            await send_device(second, b"from the second port\n")
            await page.wait_for(tail_has("from the second port"), 1000 * MS)
            assert not await page.evaluate(tail_has("not for this filter"))

            # Pause holds new lines back (and says how many); resume shows them.
            await page.evaluate("document.getElementById('pause').click()")
            assert (
                await page.evaluate("document.getElementById('pause').getAttribute('aria-pressed')")
                == "true"
            )
            await send_device(second, b"while paused\n")
            await page.wait_for(
                "document.getElementById('tail-state').textContent.includes('1 new line')", LOAD
            )
            assert not await page.evaluate(tail_has("while paused"))
            await page.evaluate("document.getElementById('pause').click()")
            await page.wait_for(tail_has("while paused"), 1000 * MS)
        finally:
            device.close()


@browser_test
async def test_browser_phone_layout(tmp_path: Path, notify: NotifySocket, browser: Browser) -> None:
    async with run_daemon(tmp_path, notify) as d, open_page(browser, d.url + "/") as page:
        await page.viewport(390, 844, mobile=True)
        await page.wait_for("document.querySelectorAll('#ports-body tr').length === 2", LOAD)
        await send_device(d.ports[0], b"x" * 300 + b"\n")
        await page.wait_for(f"{tail_lines()}.length === 1", LOAD)
        # Nothing sticks out sideways; each port is a card with labelled values.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        label = await page.evaluate(
            f"getComputedStyle({cell(d.ports[0], 'connections')}, '::before').content"
        )
        assert label == '"Connections"'
        await page.screenshot(tmp_path / "status-page-phone.png")


@browser_test
async def test_browser_token_prompt(tmp_path: Path, notify: NotifySocket, browser: Browser) -> None:
    """Real token mode: the page asks once, keeps the token for the tab, asks again once revoked."""
    extra = '[auth]\nmode = "token"\n'
    async with (
        run_daemon(tmp_path, notify, extra=extra) as d,
        d.admin() as admin,
        open_page(browser, d.url + "/") as page,
    ):
        created = await admin.post("/v1/tokens", json={"name": "operator"})
        token = created.json()["token"]
        form_shown = "!document.getElementById('token-form').hidden"
        await page.wait_for(form_shown, LOAD)
        assert await page.evaluate("document.getElementById('ports-section').hidden")
        assert await page.evaluate("document.activeElement.id") == "token-input"
        assert await page.evaluate("document.getElementById('token-error').textContent") == ""

        # A wrong token: asked again, with a reason; nothing kept.
        await page.type_text("rlyd_wrong")
        await page.press("Enter", "Enter", 13)
        error = "document.getElementById('token-error').textContent.includes('not accepted')"
        await page.wait_for(f"{form_shown} && {error}", LOAD)
        assert await page.evaluate("sessionStorage.length") == 0

        # The right one, typed and submitted with the keyboard.
        await page.type_text(token)
        await page.press("Enter", "Enter", 13)
        await page.wait_for("document.querySelectorAll('#ports-body tr').length === 2", LOAD)
        await page.wait_for(LIVE, LOAD)
        await send_device(d.ports[0], b"with a token\n")
        await page.wait_for(tail_has("with a token"), 1000 * MS)
        assert await page.evaluate("sessionStorage.getItem('relayd.token')") == token
        assert await page.evaluate("localStorage.length") == 0
        assert token not in await page.evaluate("location.href")
        assert await page.evaluate("document.getElementById('token-form').hidden")
        # Sent as a bearer token to /status.json and as ?access_token= to /ws.
        requests = [
            r["request"]
            for r in page.events("Network.requestWillBeSent")
            if r["request"]["url"].endswith("/status.json")
        ]
        assert requests[-1]["headers"].get("Authorization") == f"Bearer {token}"
        sockets = [s["url"] for s in page.events("Network.webSocketCreated")]
        assert sockets and f"access_token={token}" in sockets[-1]

        # Asked once: a reload keeps the token for this tab.
        await page.reload(LOAD)
        await page.wait_for("document.querySelectorAll('#ports-body tr').length === 2", LOAD)
        assert await page.evaluate("document.getElementById('token-form').hidden")

        # The token is revoked: the page's connection closes (1008), the token is
        # dropped and asked for again.
        assert (await admin.delete("/v1/tokens/operator")).status_code == 200
        await page.wait_for(f"{form_shown}", POLL)
        assert await page.evaluate("sessionStorage.length") == 0
        await page.screenshot(tmp_path / "status-page-token.png")


@browser_test
@pytest.mark.skipif(
    not os.environ.get("RELAYD_UPDATE_SCREENSHOT"),
    reason="set RELAYD_UPDATE_SCREENSHOT=1 to redo docs/status-page.png (30 s of traffic)",
)
async def test_browser_readme_screenshot(
    tmp_path: Path, notify: NotifySocket, browser: Browser
) -> None:
    """Not a check: half a minute of made-up traffic, then the README's screenshot."""
    async with run_daemon(tmp_path, notify, nports=0) as d, d.admin() as admin:
        names = ["scale-1", "plc-line-2", "barcode-3"]
        ports = [free_port() for _ in names]
        for port, name in zip(ports, names, strict=True):
            added = await admin.post("/v1/ports", json={"port": port, "name": name})
            assert added.status_code == 201, added.text
        loop = asyncio.get_running_loop()
        async with open_page(browser, d.url + "/", height=720) as page:
            devices = [await send_device(port, close=False) for port in ports]
            try:
                start = loop.time()
                tick = 0
                while loop.time() - start < 30:
                    tick += 1
                    weight = 12.4 + (tick % 7) / 10
                    await loop.sock_sendall(devices[0], f"ST,GS,{weight:+08.2f} kg\n".encode())
                    burst = 1 + (tick * 5) % 4
                    lines = "".join(
                        f"line2 temp={61 + i % 4}.{tick % 10} C ok\n" for i in range(burst)
                    )
                    await loop.sock_sendall(devices[1], lines.encode())
                    if tick % 4 == 0:
                        await loop.sock_sendall(devices[2], f"EAN13 40{tick:011d}\n".encode())
                    if tick == 120:
                        await loop.sock_sendall(devices[0], b"<script>alert(1)</script>\n")
                    await asyncio.sleep(0.2)  # pacing made-up traffic, not waiting for anything
                await page.evaluate("document.getElementById('port-filter').value = ''")
                await page.wait_for(f"{tail_lines()}.length >= 20", LOAD)
                await page.screenshot(tmp_path / "status-page.png")
                shutil.copyfile(tmp_path / "status-page.png", SCREENSHOT)
            finally:
                for device in devices:
                    device.close()
