"""Access control on [http]: tokens, Origin, ports, revocation and expiry, against the daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from tests.helpers import MS, NotifySocket, run_daemon, send_device

pytestmark = pytest.mark.anyio

TOKEN_MODE = '[auth]\nmode = "token"\n'


async def add_token(admin: httpx.AsyncClient, name: str, **body: Any) -> str:
    answer = await admin.post("/v1/tokens", json={"name": name, **body})
    assert answer.status_code == 201, answer.text
    token = answer.json()["token"]
    assert token.startswith("rlyd_") and len(token) >= 5 + 22  # >= 128 bits
    return str(token)


async def refused_with(url: str, **kw: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kw):
            pass
    response = info.value.response
    return response.status_code, bytes(response.body or b"").decode()


async def closed(ws: ClientConnection, timeout_ms: float = 3_000) -> tuple[int | None, str]:
    async with asyncio.timeout(timeout_ms * MS):
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason or ""


async def test_token_mode_refuses_anonymous_clients_before_the_upgrade(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        status, body = await refused_with(d.ws_url)
        assert status == 401 and "token is required" in body
        async with httpx.AsyncClient() as client:
            metrics = await client.get(f"{d.url}/metrics")
            assert metrics.status_code == 401
            assert metrics.headers["www-authenticate"] == "Bearer"
            assert (await client.get(f"{d.url}/healthz")).status_code == 200
            assert (await client.get(f"{d.url}/readyz")).status_code == 200
            assert (await client.get(f"{d.url}/status.json")).status_code == 401
        # On the admin socket no token is needed: its file mode is the access control.
        async with unix_connect(str(d.admin_socket), "ws://relayd/ws"):
            pass
        assert (await admin.get("/metrics")).status_code == 200

        token = await add_token(admin, "dashboard")
        caplog.set_level(logging.INFO)
        async with connect(d.ws_url + "?access_token=" + token) as by_query:
            async with connect(d.ws_url, additional_headers={"Authorization": f"Bearer {token}"}):
                await send_device(d.ports[0], b"weighed\n")
                async with asyncio.timeout(5_000 * MS):
                    assert await by_query.recv() == "weighed"
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client:
            text = (await client.get(f"{d.url}/metrics")).text
        assert 'relayd_auth_failures_total{reason="missing"} 3.0' in text
        assert token not in caplog.text  # never in a log line
        listed = (await admin.get("/v1/tokens")).json()
        assert [t["name"] for t in listed] == ["dashboard"]
        assert "token" not in listed[0] and listed[0]["last_used"] is not None
    tokens_file = d.state_dir / "tokens.json"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    assert token not in tokens_file.read_text()  # stored as a hash only


async def test_port_permissions(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        first, second = d.ports
        token = await add_token(admin, "scale-view", read=[first])
        status, body = await refused_with(f"{d.ws_url}?port={second}&access_token={token}")
        assert status == 403 and "may not read" in body
        # No ?port=: the ports the token may read, and nothing else.
        async with connect(f"{d.ws_url}?access_token={token}") as ws:
            await send_device(second, b"secret plc value\n")
            await send_device(first, b"scale value\n")
            async with asyncio.timeout(5_000 * MS):
                assert await ws.recv() == "scale value"
        async with httpx.AsyncClient() as client:
            seen = (await client.get(f"{d.url}/status.json?access_token={token}")).json()
        assert [p["port"] for p in seen["ports"]] == [first]
        writer = await add_token(admin, "tare", read=[], write=[second])
        async with connect(f"{d.ws_url}?port={second}&access_token={writer}"):
            pass  # write permission implies read


async def test_origin_rule_in_both_modes(tmp_path: Path, notify: NotifySocket) -> None:
    http_extra = 'allowed_origins = ["https://dash.example:8443"]\n'
    async with run_daemon(tmp_path, notify, http_extra=http_extra) as d:
        own = f"http://127.0.0.1:{d.http_port}"
        for origin in (own, "https://dash.example:8443", "HTTPS://DASH.example:8443"):
            async with connect(d.ws_url, origin=origin):  # type: ignore[arg-type]
                pass
        for origin in ("https://evil.example", "null", "https://dash.example", "x" * 2000):
            status, _ = await refused_with(d.ws_url, origin=origin)  # type: ignore[arg-type]
            assert status == 403, origin[:40]
        # 100 KB: past what the HTTP parser reads of a header, refused before any check:
        # 431 from h11 >= 0.15, the connection closed unanswered by older ones.
        with pytest.raises((InvalidStatus, InvalidMessage)) as huge:
            async with connect(d.ws_url, origin="x" * 100_000):  # type: ignore[arg-type]
                pass
        if isinstance(huge.value, InvalidStatus):
            assert huge.value.response.status_code == 431
        async with connect(d.ws_url):  # no Origin: not a browser
            pass
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        token = await add_token(admin, "page")
        # Origin is checked first: a good token does not help a foreign page.
        url = f"{d.ws_url}?access_token={token}"
        status, _ = await refused_with(url, origin="https://evil.example")  # type: ignore[arg-type]
        assert status == 403


async def test_revoking_a_token_closes_its_connections(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        token = await add_token(admin, "tablet")
        other = await add_token(admin, "wall")
        async with (
            connect(f"{d.ws_url}?access_token={token}") as ws,
            connect(f"{d.ws_url}?access_token={other}") as stays,
        ):
            removed = await admin.delete("/v1/tokens/tablet")
            assert removed.status_code == 200 and removed.json()["name"] == "tablet"
            assert await closed(ws, 1_000) == (1008, "token revoked")
            await stays.ping()
        status, _ = await refused_with(f"{d.ws_url}?access_token={token}")
        assert status == 401
        assert (await admin.delete("/v1/tokens/tablet")).status_code == 404


async def test_an_expiring_token_closes_its_connection(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        token = await add_token(admin, "visitor", expires_in=2)
        async with connect(f"{d.ws_url}?access_token={token}") as ws:
            assert await closed(ws, 6_000) == (1008, "token expired")
        status, body = await refused_with(f"{d.ws_url}?access_token={token}")
        assert status == 401 and "expired" in body


async def test_public_metrics(tmp_path: Path, notify: NotifySocket) -> None:
    extra = '[auth]\nmode = "token"\nmetrics = "public"\n'
    async with run_daemon(tmp_path, notify, extra=extra) as d, httpx.AsyncClient() as client:
        assert (await client.get(f"{d.url}/metrics")).status_code == 200
        assert (await client.get(f"{d.url}/status.json")).status_code == 401


def raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return data


async def test_bad_presentations_are_refused_and_nothing_else_is_disturbed(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        token = await add_token(admin, "good")
        async with connect(f"{d.ws_url}?access_token={token}") as bystander:
            base = (
                b"GET /ws%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            )
            cases = {
                "two headers": (b"", f"Authorization: Bearer {token}\r\n" * 2),
                "garbage": (b"", "Authorization: Basic Zm9vOmJhcg==\r\n"),
                "huge": (b"", "Authorization: Bearer " + "a" * 6000 + "\r\n"),
                "odd characters": (b"", "Authorization: Bearer rlyd_<script>\r\n"),
                "twice in the query": (f"?access_token={token}&access_token={token}".encode(), ""),
                "unknown": (b"?access_token=rlyd_" + b"A" * 43, ""),
                "header and query differ":
                    (b"?access_token=rlyd_x", f"Authorization: Bearer {token}\r\n"),
            }  # fmt: skip
            for what, (query, headers) in cases.items():
                answer = await asyncio.to_thread(
                    raw_request, d.http_port, base % query + headers.encode() + b"\r\n"
                )
                assert answer.startswith(b"HTTP/1.1 401"), (what, answer[:60])
            await send_device(d.ports[0], b"still flowing\n")
            async with asyncio.timeout(5_000 * MS):
                assert await bystander.recv() == "still flowing"
        counts = d.runtime.access.failures.counts
        assert counts["invalid"] == len(cases)


async def test_tokens_api_validation(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE) as d, d.admin() as admin:
        await add_token(admin, "one")
        again = await admin.post("/v1/tokens", json={"name": "one"})
        assert again.status_code == 409
        assert again.json() == {"detail": "token one already exists"}
        for body in (
            {"name": "bad name"},
            {"name": "x" * 65},
            {"name": "ok", "read": [0]},
            {"name": "ok", "read": "all"},
            {"name": "ok", "expires_in": -1},
            {"name": "ok", "write": ["8001"]},
        ):
            answer = await admin.post("/v1/tokens", json=body)
            assert answer.status_code == 422, body
            assert isinstance(answer.json()["detail"], str)
        created = (await admin.post("/v1/tokens", json={"name": "w", "write": "*"})).json()
        assert created["read"] == "*" and created["write"] == "*"


async def test_jwt_tokens(tmp_path: Path, notify: NotifySocket) -> None:
    secret = os.urandom(32).hex()
    key = tmp_path / "jwt.secret"
    key.write_text(secret)
    extra = f'[auth]\nmode = "token"\njwt_key_file = "{key}"\njwt_audience = "relayd"\n'
    async with run_daemon(tmp_path, notify, extra=extra) as d:
        now = int(time.time())
        claims = {"sub": "fleet-dash", "aud": "relayd", "exp": now + 60, "relayd_read": "*"}
        good = jwt.encode(claims, secret, algorithm="HS256")
        async with connect(d.ws_url, additional_headers={"Authorization": f"Bearer {good}"}):
            pass
        for bad in (
            {**claims, "exp": now - 10},
            {**claims, "aud": "someone-else"},
            {k: v for k, v in claims.items() if k != "exp"},
        ):
            token = jwt.encode(bad, secret, algorithm="HS256")
            status, _ = await refused_with(f"{d.ws_url}?access_token={token}")
            assert status == 401, bad
        forged = jwt.encode(claims, "another secret that is long enough!!", algorithm="HS256")
        status, _ = await refused_with(f"{d.ws_url}?access_token={forged}")
        assert status == 401


def test_an_unusable_jwt_key_fails_the_start_with_78(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import config_text, free_port, relayd_command

    cfg = tmp_path / "relayd.toml"
    missing = tmp_path / "none.pem"
    cfg.write_text(config_text(free_port(), [], extra=f'[auth]\njwt_key_file = "{missing}"\n'))
    result = subprocess.run(
        relayd_command("--config", str(cfg), "--admin-socket", str(tmp_path / "a.sock"))
        + ["--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78, result.stderr
    assert "auth.jwt_key_file" in result.stderr and "Traceback" not in result.stderr


async def test_the_admin_token_is_good_on_ws_too(tmp_path: Path, notify: NotifySocket) -> None:
    """relayctl --url --token tails /ws with the admin token (admin.token_file)."""
    async with run_daemon(tmp_path, notify, extra=TOKEN_MODE, admin_token="adm1n-s3cret") as d:
        async with connect(d.ws_url, additional_headers={"Authorization": "Bearer adm1n-s3cret"}):
            pass
        status, _ = await refused_with(f"{d.ws_url}?access_token=adm1n-wrong")
        assert status == 401
