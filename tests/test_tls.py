"""TLS on [http] and on device ports, allow lists and the handshake deadline, all real."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from relayd.config import Settings
from relayd.runtime import Runtime
from tests.certs import Authority, Pair
from tests.conftest import MS, NotifySocket, free_port, relayd_command, run_daemon, wait_until

pytestmark = pytest.mark.anyio

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("pki")
    ca = Authority(base / "ca", "relayd-test-ca")
    other = Authority(base / "other", "someone-else")
    return {
        "ca": ca,
        "server": ca.issue("relayd", server=True),
        "rotated": ca.issue("relayd-rotated", server=True),
        "device": ca.issue("scale-7"),
        "stranger": other.issue("scale-7"),
        "other": other,
    }


def tls_http(server: Pair) -> str:
    return f'tls_cert = "{server.cert}"\ntls_key = "{server.key}"\nhandshake_timeout = 0.5\n'


async def metric(url: str, name: str, **kw: object) -> float:
    async with httpx.AsyncClient(**kw) as client:  # type: ignore[arg-type]
        text = (await client.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if (
            line.startswith(name + " ")
            or line.startswith(name + "{")
            and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def closed_by_peer(sock: socket.socket, timeout_ms: float = 5_000) -> bytes:
    """Everything the peer sent before it closed."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    data = b""
    async with asyncio.timeout(timeout_ms * MS):
        try:
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        except ConnectionResetError:
            pass  # refused with a reset (abort) rather than a FIN
    return data


async def test_wss_and_https_on_http(
    tmp_path: Path, notify: NotifySocket, pki: dict[str, object]
) -> None:
    ca, server = pki["ca"], pki["server"]
    assert isinstance(ca, Authority) and isinstance(server, Pair)
    async with run_daemon(tmp_path, notify, http_extra=tls_http(server)) as d:
        https = f"https://127.0.0.1:{d.http_port}"
        async with httpx.AsyncClient(verify=ca.client_context()) as client:
            assert (await client.get(f"{https}/healthz")).json() == {"status": "ok"}
        wss = f"wss://127.0.0.1:{d.http_port}/ws?format=json"
        async with connect(wss, ssl=ca.client_context()) as ws:
            with socket.create_connection(("127.0.0.1", d.ports[0])) as dev:
                dev.sendall(b"over tls\n")
                async with asyncio.timeout(5_000 * MS):
                    envelope = json.loads(await ws.recv())
        assert envelope["data"] == "over tls" and "device" not in envelope
        # A plain-text client on the TLS port gets nothing and is counted.
        with socket.create_connection(("127.0.0.1", d.http_port)) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"HTTP/1.1 200" not in await closed_by_peer(plain)
        await wait_until(lambda: d.runtime.http_rejected["tls"] == 1)


@pytest.mark.xdist_group("heavy")  # a flood or a timed wait: one at a time
async def test_handshakes_that_never_finish_are_closed_and_counted(
    tmp_path: Path, notify: NotifySocket, pki: dict[str, object]
) -> None:
    """Hundreds of half-open connections, TLS or plain HTTP, do not keep clients out."""
    server = pki["server"]
    assert isinstance(server, Pair)
    async with run_daemon(tmp_path, notify, http_extra="handshake_timeout = 0.5\n") as d:
        slow = [socket.create_connection(("127.0.0.1", d.http_port)) for _ in range(100)]
        try:
            for i, sock in enumerate(slow):
                if i % 2:
                    sock.sendall(HANDSHAKE[: 10 + i])  # a request head that never ends
            async with httpx.AsyncClient() as client:  # meanwhile, a client gets through
                assert (await client.get(f"{d.url}/healthz")).status_code == 200
            await asyncio.gather(*(closed_by_peer(s) for s in slow))
        finally:
            for sock in slow:
                sock.close()
        assert d.runtime.http_rejected["timeout"] == 100
        # A request whose body never arrives is closed too; a complete one is not.
        with socket.create_connection(("127.0.0.1", d.http_port)) as body:
            body.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
            await closed_by_peer(body)
        async with connect(d.ws_url) as ws:  # a WebSocket lives on past the deadline
            await asyncio.sleep(1.2)  # longer than two deadlines: the point of the test
            await ws.ping()
    tls_extra = tls_http(server)
    async with run_daemon(tmp_path, notify, http_extra=tls_extra) as d:
        silent = socket.create_connection(("127.0.0.1", d.http_port))  # no ClientHello ever
        try:
            await closed_by_peer(silent)
        finally:
            silent.close()
        await wait_until(lambda: d.runtime.http_rejected["tls"] == 1)


async def test_device_tls_with_client_certificates(
    tmp_path: Path, notify: NotifySocket, pki: dict[str, object]
) -> None:
    ca, server, device, stranger = pki["ca"], pki["server"], pki["device"], pki["stranger"]
    assert isinstance(ca, Authority)
    assert isinstance(server, Pair) and isinstance(device, Pair) and isinstance(stranger, Pair)
    port = free_port()
    extra = (
        f'[[ports]]\nport = {port}\nhost = "127.0.0.1"\nname = "secure"\ntls = true\n'
        f'tls_cert = "{server.cert}"\ntls_key = "{server.key}"\nclient_ca = "{ca.cert}"\n'
    )
    async with run_daemon(
        tmp_path, notify, extra=extra, http_extra="handshake_timeout = 0.5\n"
    ) as d:
        loop = asyncio.get_running_loop()
        async with connect(d.ws_url + f"?port={port}&format=json") as ws:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ca.client_context(device)
            )
            writer.write(b"12.5 kg\n")
            await writer.drain()
            async with asyncio.timeout(5_000 * MS):
                envelope = json.loads(await ws.recv())
            assert envelope["data"] == "12.5 kg" and envelope["device"] == "scale-7"
            writer.close()
        listener = d.runtime.registry.get(port)
        # A certificate from another CA, no certificate, plain text: refused and counted.
        for context in (ca.client_context(stranger), ca.client_context()):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                try:
                    w.write(b"sneaky\n")
                    await w.drain()
                    assert await r.read() == b""  # TLS 1.3 refuses after the handshake
                    raise ConnectionResetError
                finally:
                    w.close()
        plain = socket.create_connection(("127.0.0.1", port))
        plain.setblocking(False)
        await loop.sock_sendall(plain, b"plain text\n")
        await closed_by_peer(plain)
        plain.close()
        await wait_until(lambda: listener.rejected["tls"] == 3)
        assert listener.messages_received == 1
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{d.url}/metrics")).text
        assert f'relayd_tcp_connections_rejected_total{{port="{port}",reason="tls"}} 3.0' in text


async def test_allow_refuses_other_networks_before_reading(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    extra = f'[[ports]]\nport = {port}\nhost = "0.0.0.0"\nallow = ["127.0.0.2/32"]\n'
    async with run_daemon(tmp_path, notify, extra=extra) as d:
        listener = d.runtime.registry.get(port)
        async with connect(d.ws_url + f"?port={port}") as ws:
            refused = socket.create_connection(("127.0.0.1", port))
            refused.sendall(b"not from here\n")
            await closed_by_peer(refused)
            refused.close()
            allowed = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            allowed.sendall(b"from the plc network\n")
            async with asyncio.timeout(5_000 * MS):
                assert await ws.recv() == "from the plc network"
            allowed.close()
        assert listener.rejected["not_allowed"] == 1
        assert listener.bytes_received == len(b"from the plc network\n")  # nothing else read


async def test_reload_rotates_certificates_without_dropping_connections(
    tmp_path: Path, notify: NotifySocket, pki: dict[str, object]
) -> None:
    ca, server, rotated = pki["ca"], pki["server"], pki["rotated"]
    assert isinstance(ca, Authority) and isinstance(server, Pair) and isinstance(rotated, Pair)
    live = Pair(tmp_path / "live.pem", tmp_path / "live.key")
    shutil.copy(server.cert, live.cert)
    shutil.copy(server.key, live.key)
    async with run_daemon(tmp_path, notify, http_extra=tls_http(live)) as d, d.admin() as admin:
        wss = f"wss://127.0.0.1:{d.http_port}/ws"

        async def served_cn() -> str:
            async with connect(wss, ssl=ca.client_context()) as probe:
                cert = probe.transport.get_extra_info("peercert")
                return str(dict(x[0] for x in cert["subject"])["commonName"])

        assert await served_cn() == "relayd"
        async with connect(wss, ssl=ca.client_context()) as kept:
            shutil.copy(rotated.cert, live.cert)
            shutil.copy(rotated.key, live.key)
            assert (await admin.post("/v1/reload")).status_code == 200
            assert await served_cn() == "relayd-rotated"
            # Broken files reject the reload; the running certificate stays.
            live.key.write_text("not a key\n")
            answer = await admin.post("/v1/reload")
            assert answer.status_code == 422
            assert "http: cannot use" in answer.json()["detail"]
            assert await served_cn() == "relayd-rotated"
            await kept.ping()  # the connection from before the rotation is untouched


def test_unreadable_certificates_fail_a_start_with_78(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    missing = tmp_path / "missing.pem"
    cfg.write_text(
        f'[http]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'tls_cert = "{missing}"\ntls_key = "{missing}"\n'
    )
    result = subprocess.run(
        relayd_command("--config", str(cfg), "--admin-socket", str(tmp_path / "a.sock")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert f"http: cannot read {missing}: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_tls_contexts_follow_the_files(tmp_path: Path, pki: dict[str, object]) -> None:
    server = pki["server"]
    assert isinstance(server, Pair)
    settings = Settings.model_validate(
        {
            "http": {"tls_cert": str(server.cert), "tls_key": str(server.key)},
            "ports": [{"port": 8001, "tls": True}, {"port": 8002}],
        }
    )
    http, ports = Runtime._tls_contexts(settings, settings.ports)
    assert http is not None and set(ports) == {8001}


async def test_client_certificates_on_http(
    tmp_path: Path, notify: NotifySocket, pki: dict[str, object]
) -> None:
    ca, server, device, stranger = pki["ca"], pki["server"], pki["device"], pki["stranger"]
    assert isinstance(ca, Authority) and isinstance(server, Pair)
    assert isinstance(device, Pair) and isinstance(stranger, Pair)
    http_extra = tls_http(server) + f'tls_client_ca = "{ca.cert}"\n'
    async with run_daemon(tmp_path, notify, http_extra=http_extra) as d:
        wss = f"wss://127.0.0.1:{d.http_port}/ws"
        async with connect(wss, ssl=ca.client_context(device)) as ws:
            await ws.ping()
        for context in (ca.client_context(), ca.client_context(stranger)):
            with pytest.raises((ssl.SSLError, ConnectionError, EOFError, InvalidMessage)):
                async with connect(wss, ssl=context):
                    pass
        await wait_until(lambda: d.runtime.http_rejected["tls"] == 2)
