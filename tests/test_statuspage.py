"""The status page: its HTTP routes, then the page itself in a real headless chromium."""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from fastapi import HTTPException, Request

from relayd import statuspage
from tests.conftest import NotifySocket, run_daemon, send_device, wait_until

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
