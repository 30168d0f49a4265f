"""The admin API against the real daemon over its real Unix socket."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from tests.helpers import (
    MS,
    Daemon,
    NotifySocket,
    accepts,
    busy_port,
    config_port,
    examples,
    free_port,
    recv,
    run_daemon,
    send_device,
)

pytestmark = pytest.mark.anyio

COUNTERS = ("connections", "messages_received", "bytes_received")


def runtime_ports(d: Daemon) -> list[int]:
    """The ports added at run time, as the state file has them."""
    if not (d.state_dir / "ports.json").exists():
        return []
    return [p["port"] for p in d.state()["added"]]


async def test_status_and_ports(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        status = (await admin.get("/v1/status")).json()
        assert status["state"] == "ready"
        assert status["ports"] == 2
        assert status["http"] == f"127.0.0.1:{d.http_port}"
        assert set(status) == {
            "version", "pid", "uptime_s", "state", "drain_timeout", "http", "ports",
            "tcp_connections", "ws_clients", "mqtt",
        }  # fmt: skip
        assert status["mqtt"] == {"state": "off", "spooled": 0}
        ports = (await admin.get("/v1/ports")).json()
        assert [p["port"] for p in ports] == sorted(d.ports)
        one = (await admin.get(f"/v1/ports/{d.ports[0]}")).json()
        assert one == config_port(d.ports[0], **{k: one[k] for k in COUNTERS})
        assert all(isinstance(one[k], int) for k in COUNTERS)  # other tests send data
        missing = await admin.get("/v1/ports/1")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "port 1 is not a listener"}


async def test_add_port_listens_when_answered_and_persists(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        port = free_port()
        r = await admin.post(
            "/v1/ports", json={"port": port, "name": "scale-9", "host": "127.0.0.1"}
        )
        assert r.status_code == 201, r.text
        try:
            assert r.json()["source"] == "runtime" and r.json()["state"] == "listening"
            assert await accepts(port, d)  # no retry: it listens when the answer arrives
            assert runtime_ports(d) == [port]
            again = await admin.post("/v1/ports", json={"port": port})
            assert again.status_code == 409
            assert again.json() == {"detail": f"port {port} is already a listener"}
            async with connect(f"{d.ws_url}?port={port}") as ws:
                await send_device(port, b"runtime port\n")
                assert await recv(ws) == ["runtime port"]
        finally:
            assert (await admin.delete(f"/v1/ports/{port}")).status_code == 200
        assert runtime_ports(d) == []


async def test_add_port_bind_failure_leaves_no_trace(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        with busy_port() as busy:
            r = await admin.post("/v1/ports", json={"port": busy, "host": "127.0.0.1"})
        assert r.status_code == 409
        assert r.json() == {"detail": f"port {busy}: address already in use"}
        assert (await admin.get(f"/v1/ports/{busy}")).status_code == 404
        assert busy not in runtime_ports(d)


@pytest.mark.parametrize(
    "body",
    [
        {"port": 0},
        {"port": 70000},
        {"port": "8004"},
        {"port": 8004, "framing": "csv"},
        {"port": 8004, "colour": "red"},
        {"port": 8004, "max_connections": 0},
        {},
        [1, 2],
    ],
)
async def test_add_port_invalid_body_is_422_with_one_sentence(
    shared_daemon: Daemon, body: Any
) -> None:
    async with shared_daemon.admin() as admin:
        r = await admin.post("/v1/ports", json=body)
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        not_json = await admin.post(
            "/v1/ports", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422
        assert isinstance(not_json.json()["detail"], str)


async def test_remove_drains_that_port_alone(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        removed, other = d.ports
        loop = asyncio.get_running_loop()
        async with connect(d.ws_url, max_queue=None) as ws:
            streaming = await send_device(other, close=False)
            leaving = await send_device(removed, b"bye\n", close=False)
            assert await recv(ws) == ["bye"]
            remove = asyncio.create_task(admin.delete(f"/v1/ports/{removed}"))
            sent = 0
            while not remove.done() and sent < 2000:
                await loop.sock_sendall(streaming, b"other %d\n" % sent)
                sent += 1
                if sent == 50:
                    leaving.close()  # the device on the removed port finishes on its own
                await asyncio.sleep(0.001)
            r = await asyncio.wait_for(remove, 10)
            assert r.status_code == 200
            final = r.json()
            assert final["port"] == removed
            assert final["messages_received"] == 1 and final["bytes_received"] == 4
            await loop.sock_sendall(streaming, b"end\n")
            got: list[str | bytes] = []
            async with asyncio.timeout(5_000 * MS):
                while not got or got[-1] != "end":
                    got.append(await ws.recv())
            assert got == [f"other {i}" for i in range(sent)] + ["end"]
            streaming.close()
        assert not await accepts(removed)
        assert d.state()["removed"] == [removed]
        assert (await admin.delete(f"/v1/ports/{removed}")).status_code == 404


async def test_remove_force_skips_the_drain(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, drain=30.0) as d, d.admin() as admin:
        device = await send_device(d.ports[0], b"x\n", close=False)
        async with asyncio.timeout(5_000 * MS):
            r = await admin.delete(f"/v1/ports/{d.ports[0]}", params={"force": "true"})
        assert r.status_code == 200
        device.close()


async def test_concurrent_changes_on_one_port_are_serialized(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        port = free_port()
        adds = await asyncio.gather(
            *(admin.post("/v1/ports", json={"port": port, "host": "127.0.0.1"}) for _ in range(20))
        )
        assert sorted(r.status_code for r in adds) == [201] + [409] * 19
        removes = await asyncio.gather(*(admin.delete(f"/v1/ports/{port}") for _ in range(5)))
        assert all(r.status_code in (200, 404) for r in removes)
        assert (await admin.get(f"/v1/ports/{port}")).status_code == 404
        assert runtime_ports(d) == []
        assert not await accepts(port)


async def test_state_write_failure_is_500_and_changes_nothing(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        d.state_dir.parent.mkdir(parents=True, exist_ok=True)
        d.state_dir.write_text("not a directory")  # every write into it fails
        port = free_port()
        r = await admin.post("/v1/ports", json={"port": port, "host": "127.0.0.1"})
        assert r.status_code == 500
        assert "cannot write state file" in r.json()["detail"]
        assert not await accepts(port)
        r = await admin.delete(f"/v1/ports/{d.ports[0]}")
        assert r.status_code == 500
        assert await accepts(d.ports[0], d)
        assert (await admin.get(f"/v1/ports/{d.ports[0]}")).json()["state"] == "listening"


async def test_runtime_changes_survive_a_restart(tmp_path: Path, notify: NotifySocket) -> None:
    added = free_port()
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        ports = d.ports
        r = await admin.post("/v1/ports", json={"port": added, "host": "127.0.0.1"})
        assert r.status_code == 201
        assert (await admin.delete(f"/v1/ports/{ports[0]}")).status_code == 200
    async with run_daemon(tmp_path, notify, ports=ports) as d, d.admin() as admin:
        listed = {p["port"]: p["source"] for p in (await admin.get("/v1/ports")).json()}
        assert listed == {ports[1]: "config", added: "runtime"}
        assert not await accepts(ports[0])


async def test_corrupt_state_is_set_aside(tmp_path: Path, notify: NotifySocket) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "ports.json").write_text('{"added": [{"port": "x"}]')
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        assert len((await admin.get("/v1/ports")).json()) == 2
    aside = list(state.glob("ports.json.corrupt-*"))
    assert len(aside) == 1
    assert not (state / "ports.json").exists()


async def test_reload_reports_and_keeps_runtime_ports(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        runtime_port, new_port = free_port(), free_port()
        await admin.post("/v1/ports", json={"port": runtime_port, "host": "127.0.0.1"})
        keep, drop = d.ports
        text = d.config.read_text()
        head, _, _ = text.partition("[[ports]]")
        d.config.write_text(
            head
            + f'[[ports]]\nport = {keep}\nhost = "127.0.0.1"\nname = "renamed"\n'
            + f'[[ports]]\nport = {new_port}\nhost = "127.0.0.1"\n'
        )
        r = await admin.post("/v1/reload")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "added": [new_port],
            "removed": [drop],
            "changed": [keep],
            "failed": [],
        }
        await notify.wait_for("RELOADING=1")
        await notify.wait_for("READY=1")
        listed = {p["port"]: p for p in (await admin.get("/v1/ports")).json()}
        assert set(listed) == {keep, new_port, runtime_port}
        assert listed[keep]["name"] == "renamed"
        assert listed[runtime_port]["source"] == "runtime"
        d.config.write_text(text + "\n[relay]\nqueue_size = -1\n")
        bad = await admin.post("/v1/reload")
        assert bad.status_code == 422
        assert "relay.queue_size" in bad.json()["detail"]
        await notify.wait_for("READY=1")  # READY=1 follows a rejected reload too
        assert {p["port"] for p in (await admin.get("/v1/ports")).json()} == set(listed)


async def test_reload_reports_ports_that_cannot_be_bound(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify) as d, d.admin() as admin:
        with busy_port() as busy:
            d.config.write_text(
                d.config.read_text() + f'[[ports]]\nport = {busy}\nhost = "127.0.0.1"\n'
            )
            r = await admin.post("/v1/reload")
        assert r.status_code == 200
        assert r.json()["failed"] == [
            {"port": busy, "detail": f"port {busy}: address already in use"}
        ]


async def test_admin_on_http_port_needs_the_token(tmp_path: Path, notify: NotifySocket) -> None:
    async with run_daemon(tmp_path, notify, nports=1, admin_token="s3cret") as d:
        async with httpx.AsyncClient(base_url=d.url) as client:
            assert (await client.get("/v1/status")).status_code == 401
            wrong = await client.get("/v1/status", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert isinstance(wrong.json()["detail"], str)
            ok = await client.get("/v1/status", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert (await client.get("/healthz")).status_code == 200


async def test_openapi_documents_every_route(shared_daemon: Daemon) -> None:
    async with shared_daemon.admin() as admin:
        spec = (await admin.get("/openapi.json")).json()
        paths = spec["paths"]
        assert set(paths) >= {"/v1/status", "/v1/ports", "/v1/ports/{port}", "/v1/reload"}
        assert "409" in paths["/v1/ports"]["post"]["responses"]
        assert "404" in paths["/v1/ports/{port}"]["delete"]["responses"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
bodies = (
    st.dictionaries(
        st.sampled_from(["port", "host", "name", "framing", "max_connections", "x"]),
        json_values,
    )
    | json_values
)


# 25 in `make test`, 100 with RELAYD_TEST_THOROUGH=1, more in `make soak-timing`:
# RELAYD_TEST_FUZZ_EXAMPLES=1000.
@settings(
    max_examples=int(os.environ.get("RELAYD_TEST_FUZZ_EXAMPLES", str(examples(100)))),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(body=bodies, path=st.sampled_from(["/v1/ports", "/v1/ports/abc", "/v1/reload"]))
async def test_fuzzed_admin_requests_never_get_a_5xx(
    shared_daemon: Daemon, body: Any, path: str
) -> None:
    if isinstance(body, dict) and isinstance(body.get("port"), int):
        body["port"] = 20000 + body["port"] % 40000  # stay clear of well-known ports
        body.pop("host", None)
        body["host"] = "127.0.0.1"
    async with shared_daemon.admin() as admin:
        r = await admin.post(path, json=body)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert isinstance(r.json()["detail"], str)
        if r.status_code == 201:
            port = r.json()["port"]
            removed = await admin.delete(f"/v1/ports/{port}", params={"force": "true"})
            assert removed.status_code == 200


async def test_a_runtime_port_without_host_binds_the_defaults_host(
    tmp_path: Path, notify: NotifySocket
) -> None:
    extra = '[defaults]\nhost = "127.0.0.2"\n'
    async with run_daemon(tmp_path, notify, extra=extra) as d, d.admin() as admin:
        port = free_port()
        added = await admin.post("/v1/ports", json={"port": port})
        assert added.status_code == 201, added.text
        assert added.json()["host"] == "127.0.0.2"
        with socket.create_connection(("127.0.0.2", port), timeout=1):
            pass
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
