"""Admin API abuse and crash safety (issue 7): bodies, content types, storms, ``kill -9``."""

from __future__ import annotations

import asyncio
import builtins
import errno
import json
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from relayd.api import MAX_BODY
from relayd.config import PortSettings, Settings
from relayd.listeners import Listener
from relayd.state import STATE_FILE, PortState
from tests.helpers import (
    MS,
    THOROUGH,
    Daemon,
    NotifySocket,
    accepts,
    admin_client,
    config_text,
    free_port,
    run_daemon,
    send_device,
    start_process,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def one_sentence(r: httpx.Response) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, r.text
    return detail


def port_body(port: int, **extra: Any) -> bytes:
    return json.dumps({"port": port, "host": "127.0.0.1", **extra}).encode()


# Bodies


async def test_oversized_bodies_are_413_and_change_nothing(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        port = free_port()
        small = port_body(port)
        over = small + b" " * (MAX_BODY + 1 - len(small))  # valid JSON, one byte too long
        r = await admin.post("/v1/ports", content=over, headers=JSON)
        assert r.status_code == 413, r.text
        assert str(MAX_BODY) in one_sentence(r)

        async def chunked() -> AsyncIterator[bytes]:
            yield small
            for _ in range(64):  # 1 MiB in all, and no Content-Length to go by
                yield b" " * 16384

        r = await admin.post("/v1/ports", content=chunked(), headers=JSON)
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413, r.text
        one_sentence(r)

        # A huge declared body is refused before it is read.
        huge = small + b" " * (16 * 1024 * 1024)
        async with asyncio.timeout(5_000 * MS):
            r = await admin.post("/v1/ports", content=huge, headers=JSON)
        assert r.status_code == 413
        assert (await admin.get(f"/v1/ports/{port}")).status_code == 404
        assert not await accepts(port, d)
        assert port not in runtime_ports(d)

        exact = small + b" " * (MAX_BODY - len(small))  # at the limit: accepted
        r = await admin.post("/v1/ports", content=exact, headers=JSON)
        assert r.status_code == 201, r.text
        assert await accepts(port, d)
        assert (await admin.delete(f"/v1/ports/{port}")).status_code == 200


async def test_bodies_that_are_not_json_are_415(shared_daemon: Daemon) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        port = free_port()
        body = port_body(port)
        refused: list[dict[str, Any]] = [
            {"content": body, "headers": {"content-type": "text/plain"}},
            {"content": body, "headers": {"content-type": "application/xml"}},
            {"content": body, "headers": {"content-type": "application/x-www-form-urlencoded"}},
            {"data": {"port": str(port), "host": "127.0.0.1"}},  # an HTML form
            {"files": {"port": ("port.json", body, "application/json")}},  # multipart
            {"content": b"\x00\xff" * 100, "headers": {"content-type": "application/octet-stream"}},
        ]
        for kwargs in refused:
            r = await admin.post("/v1/ports", **kwargs)
            assert r.status_code == 415, (kwargs, r.text)
            assert "JSON" in one_sentence(r)
        assert (await admin.get(f"/v1/ports/{port}")).status_code == 404
        assert not await accepts(port, d)
        # A bodyless POST (curl -X POST) needs no content type; JSON variants are JSON.
        r = await admin.post("/v1/reload", headers={"content-type": "text/plain"})
        assert r.status_code == 200, r.text
        r = await admin.post("/v1/ports", content=body)  # no content type at all
        assert r.status_code == 415, r.text
        r = await admin.post(
            "/v1/ports", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert r.status_code == 201, r.text
        assert await accepts(port, d)
        assert runtime_ports(d) == [port]
        assert (await admin.delete(f"/v1/ports/{port}")).status_code == 200


def runtime_ports(d: Daemon) -> list[int]:
    """The ports added at run time, as the state file has them."""
    if not (d.state_dir / STATE_FILE).exists():
        return []
    return [p["port"] for p in d.state()["added"]]


# Storms


async def assert_agreement(d: Daemon, admin: httpx.AsyncClient, candidates: set[int]) -> None:
    """The API, the registry, the listening sockets and the state file say the same."""
    listed = {p["port"]: p for p in (await admin.get("/v1/ports")).json()}
    assert {p["state"] for p in listed.values()} <= {"listening"}
    assert set(listed) == {listener.port for listener in d.runtime.registry.listeners()}
    state = PortState(d.state_dir)
    state.load()
    config = Settings.load(d.config, admin_socket=str(d.admin_socket))
    desired = state.apply(config.ports)
    assert {port: origin for port, (_, origin) in desired.items()} == {
        port: p["source"] for port, p in listed.items()
    }
    for port, (settings, _) in desired.items():
        shown = {k: listed[port][k] for k in ("host", "name", "framing", "max_connections")}
        assert shown == settings.model_dump(include=set(shown))
    for port in candidates:
        assert await accepts(port, d) == (port in listed), port
    assert not list(d.state_dir.glob(f"{STATE_FILE}.corrupt-*"))


Request = tuple[str, str, dict[str, Any]]


def storm(rng: random.Random, ports: list[int], n: int) -> list[Request]:
    """``n`` random admin requests on ``ports``: adds, removes, reloads and reads."""
    requests: list[Request] = []
    for _ in range(n):
        port = rng.choice(ports)
        kind = rng.choices(["add", "remove", "reload", "get"], weights=[5, 4, 1, 1])[0]
        if kind == "add":
            name = rng.choice([None, f"storm-{rng.randrange(3)}"])
            body = {"port": port, "host": "127.0.0.1"} | ({"name": name} if name else {})
            requests.append(("POST", "/v1/ports", {"json": body}))
        elif kind == "remove":
            force = {"params": {"force": "true"}} if rng.random() < 0.3 else {}
            requests.append(("DELETE", f"/v1/ports/{port}", force))
        elif kind == "reload":
            requests.append(("POST", "/v1/reload", {}))
        else:
            requests.append(("GET", f"/v1/ports/{port}", {}))
    return requests


EXPECTED_STATUS = {
    "POST /v1/ports": {201, 409},
    "DELETE": {200, 404},
    "POST /v1/reload": {200},
    "GET": {200, 404},
}


async def run_storm(
    admin: httpx.AsyncClient, requests: list[tuple[str, str, dict[str, Any]]]
) -> None:
    async with asyncio.timeout(20_000 * MS):
        answers = await asyncio.gather(
            *(admin.request(method, url, **kwargs) for method, url, kwargs in requests)
        )
    for (method, url, _), r in zip(requests, answers, strict=True):
        key = next(k for k in EXPECTED_STATUS if f"{method} {url}".startswith(k))
        assert r.status_code in EXPECTED_STATUS[key], (method, url, r.status_code, r.text)
        if r.status_code >= 400:
            one_sentence(r)


# Requests in each storm; more in a soak run: RELAYD_TEST_STORM=500.
STORM = int(os.environ.get("RELAYD_TEST_STORM", "60"))


@pytest.mark.xdist_group("heavy")  # a flood or a timed wait: one at a time
async def test_storms_of_changes_leave_api_sockets_and_state_in_agreement(
    tmp_path: Path, notify: NotifySocket
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with run_daemon(tmp_path, notify, drain=0.2) as d, notify.drained():
        # A connection for each request, as relayctl makes: a kept-alive one that sat
        # idle through a long storm can meet uvicorn's keep-alive timeout (5 s) on reuse.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        transport = httpx.AsyncHTTPTransport(uds=str(d.admin_socket), limits=limits, verify=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://relayd") as admin:
            config_ports = list(d.ports)
            spare = [free_port() for _ in range(4)]
            candidates = set(config_ports + spare)
            # Devices stay connected, so removals really drain while other requests arrive.
            devices = [await send_device(p, b"hello\n", close=False) for p in config_ports]
            try:
                same = rng.choice(spare)
                for requests in (
                    storm(rng, [same], STORM),  # one port
                    storm(rng, spare + config_ports, STORM),  # different ports
                    storm(rng, [same], STORM // 2)
                    + storm(rng, spare + config_ports, STORM // 2),  # mixed
                ):
                    rng.shuffle(requests)
                    await run_storm(admin, requests)
                    await assert_agreement(d, admin, candidates)
                # The config changes under a storm that reloads: agreement with the new file.
                text = d.config.read_text()
                moved = config_text(
                    d.http_port, [config_ports[0], spare[0]], drain=0.2
                )  # drops config_ports[1], adds spare[0] to the file
                d.config.write_text(moved)
                requests = storm(rng, spare + config_ports, STORM - 10)
                requests += [("POST", "/v1/reload", {})] * 10
                rng.shuffle(requests)
                await run_storm(admin, requests)
                await assert_agreement(d, admin, candidates)
                d.config.write_text(text)
                assert (await admin.post("/v1/reload")).status_code == 200
                await assert_agreement(d, admin, candidates)
            except AssertionError as exc:
                raise AssertionError(f"storm seed {seed}: {exc}") from exc
            finally:
                for device in devices:
                    device.close()


async def test_reload_during_a_removal_drain_opens_the_port_the_new_config_wants(
    tmp_path: Path, notify: NotifySocket
) -> None:
    async with run_daemon(tmp_path, notify, nports=1, drain=1.0) as d, d.admin() as admin:
        port = free_port()
        assert (await admin.post("/v1/ports", content=port_body(port), headers=JSON)).is_success
        device = await send_device(port, b"hi\n", close=False)  # holds the drain open
        try:
            listener = d.runtime.registry.get(port)
            await wait_until(lambda: len(listener.connections) == 1)
            removal = asyncio.create_task(admin.delete(f"/v1/ports/{port}"))
            await wait_until(lambda: listener.draining)
            # Meanwhile the operator puts the port into the config file and reloads.
            d.config.write_text(config_text(d.http_port, [*d.ports, port], drain=1.0))
            reload = await admin.post("/v1/reload")
            assert reload.status_code == 200
            assert reload.json()["added"] == [port]
            assert (await removal).status_code == 200
        finally:
            device.close()
        listed = {p["port"]: p["source"] for p in (await admin.get("/v1/ports")).json()}
        assert listed == {d.ports[0]: "config", port: "config"}
        await assert_agreement(d, admin, {*d.ports, port})


async def test_a_listener_that_fails_to_start_is_not_persisted(
    shared_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = shared_daemon
    async with d.admin() as admin:
        port = free_port()

        async def broken(self: Listener) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(Listener, "start", broken)
        r = await admin.post("/v1/ports", content=port_body(port), headers=JSON)
        assert r.status_code == 500
        monkeypatch.undo()
        assert port not in runtime_ports(d)  # saved, then put back
        await assert_agreement(d, admin, {*d.ports, port})


# Crash safety


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no cleanup, no except clause."""


def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = PortState(tmp_path).with_added(PortSettings(port=9001, name="old"))
    old.save()
    new = old.with_added(PortSettings(port=9002, name="x" * 100)).with_removed(
        9001, in_config=False
    )
    step = 0
    crash_at = 0

    def tick() -> None:
        nonlocal step
        step += 1
        if step == crash_at:
            raise Crash

    class TornFile:
        """A file that dies halfway through a write."""

        def __init__(self, f: IO[bytes]) -> None:
            self.f = f

        def __enter__(self) -> TornFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            if step + 1 == crash_at:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
            tick()
            return self.f.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    real_open, real_fsync, real_replace = builtins.open, os.fsync, os.replace

    def fake_open(*args: Any, **kwargs: Any) -> Any:
        tick()
        return TornFile(real_open(*args, **kwargs))

    def fake_fsync(fd: int) -> None:
        tick()
        real_fsync(fd)

    def fake_replace(src: Any, dst: Any) -> None:
        tick()
        real_replace(src, dst)

    import relayd.atomicfile

    monkeypatch.setattr(relayd.atomicfile, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "fsync", fake_fsync)
    monkeypatch.setattr(os, "replace", fake_replace)
    outcomes = []
    for crash_at in range(1, 10):
        step = 0
        try:
            new.save()
        except Crash:
            pass
        else:
            break  # fewer steps than crash_at: the save completed
        finally:
            loaded = PortState(tmp_path)
            loaded.load()
            outcomes.append(sorted(loaded.added))
            assert not list(tmp_path.glob(f"{STATE_FILE}.corrupt-*"))
            assert not list(tmp_path.glob(f".{STATE_FILE}.tmp-*"))  # leftovers are cleaned
            crash_at = 0
            old.save()
    # open, write, fsync, replace, directory fsync: the file flips at the rename.
    assert outcomes == [[9001]] * 4 + [[9002]] * 2, outcomes


@dataclass
class Change:
    method: str
    port: int
    force: bool = False


async def admin_call(sock: Path, method: str, target: str, body: Any = None) -> int | None:
    """One request on a fresh connection; None when no complete answer arrived.

    A plain stream rather than httpx: the daemon is killed under it, and httpcore leaks
    the socket of a refused connect.
    """
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
    except OSError:
        return None
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nhost: relayd\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        data = await reader.read()
    except OSError:
        return None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    head, sep, content = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (
            int(v)
            for k, _, v in (h.partition(":") for h in lines[1:])
            if k.lower() == "content-length"
        ),
        None,
    )
    if length is None or len(content) < length:
        return None  # cut off: not an answer
    return int(lines[0].split()[1])


async def listed_ports(sock: Path) -> dict[int, str]:
    async with admin_client(sock) as admin:
        return {p["port"]: p["source"] for p in (await admin.get("/v1/ports")).json()}


# Restarts after a SIGKILL: 2 in `make test`, 8 in `make test-thorough`, more in a soak
# run (RELAYD_TEST_KILLS=50). Each kill lands at a random moment; the seed is in any failure.
KILLS = int(os.environ.get("RELAYD_TEST_KILLS", "8" if THOROUGH else "2"))


# Not in the heavy group: neither a flood nor a timed wait (the kill lands at a random
# moment on purpose, and nothing is timed), so it may run beside them.
async def test_kill_9_during_admin_changes_keeps_the_last_acknowledged_state(
    tmp_path: Path,
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    config_ports = [free_port(), free_port()]
    spare = [free_port() for _ in range(6)]
    http_port = free_port()
    cfg = write_config(tmp_path / "relayd.toml", config_text(http_port, config_ports, drain=0.1))
    sock = tmp_path / "admin.sock"
    state_dir = tmp_path / "state"
    expected = dict.fromkeys(config_ports, "config")
    in_flight: Change | None = None
    kills = KILLS
    for n in range(kills + 1):
        killed = asyncio.Event()
        notify = NotifySocket(tmp_path / f"notify-{n}.sock")
        try:
            started = await start_process(
                tmp_path,
                cfg,
                notify,
                http_port=http_port,
                ports=config_ports,
                log=tmp_path / f"relayd-{n}.log",
            )
        finally:
            notify.close()
        assert started is not None, "a port of relayd's was taken"
        proc, log = started.proc, started.log
        try:
            actual = await listed_ports(sock)
            allowed = [expected]
            if in_flight is not None:
                allowed.append(apply_change(expected, in_flight))
            context = f"seed {seed}, restart {n}, in flight {in_flight}"
            assert actual in allowed, context
            assert not list(state_dir.glob(f"{STATE_FILE}.corrupt-*")), context
            assert "corrupt" not in log.read_text(), context
            expected, in_flight = actual, None
            if n == kills:
                break

            # Changes one after the other, each answered before the next; SIGKILL lands
            # at a random moment.
            def kill(
                proc: asyncio.subprocess.Process = proc, killed: asyncio.Event = killed
            ) -> None:
                proc.send_signal(signal.SIGKILL)
                killed.set()

            asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.4), kill)
            while not killed.is_set():
                change = random_change(rng, expected, config_ports + spare)
                in_flight = change
                status = await apply_remotely(sock, change)
                if status is None:
                    break  # killed in flight
                if status in (200, 201):
                    expected = apply_change(expected, change)
                in_flight = None
            async with asyncio.timeout(5_000 * MS):
                await killed.wait()
        finally:
            # One signal only: Popen.send_signal polls, and may reap the child under
            # asyncio's watcher, which then reports 255.
            if proc.returncode is None and not killed.is_set():
                proc.send_signal(signal.SIGTERM if n == kills else signal.SIGKILL)
            async with asyncio.timeout(15_000 * MS):
                await proc.wait()
        assert proc.returncode == -signal.SIGKILL


async def apply_remotely(sock: Path, change: Change) -> int | None:
    if change.method == "POST":
        body = {"port": change.port, "host": "127.0.0.1"}
        return await admin_call(sock, "POST", "/v1/ports", body)
    if change.method == "DELETE":
        force = "?force=true" if change.force else ""
        return await admin_call(sock, "DELETE", f"/v1/ports/{change.port}{force}")
    return await admin_call(sock, "POST", "/v1/reload")


def random_change(rng: random.Random, current: dict[int, str], ports: list[int]) -> Change:
    roll = rng.random()
    if roll < 0.1:
        return Change("RELOAD", 0)
    absent = [p for p in ports if p not in current]
    if absent and (roll < 0.6 or not current):
        return Change("POST", rng.choice(absent))
    return Change("DELETE", rng.choice(sorted(current)), force=rng.random() < 0.5)


def apply_change(current: dict[int, str], change: Change) -> dict[int, str]:
    new = dict(current)
    if change.method == "POST":
        new[change.port] = "runtime"
    elif change.method == "DELETE":
        new.pop(change.port, None)
    return new
