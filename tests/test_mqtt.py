"""The MQTT uplink (relayd(8), MQTT): a real relayd publishing to a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd import daemon, mqtt
from relayd.config import Settings
from relayd.errors import ConfigError
from tests.helpers import MS, Daemon, NotifySocket, device, run_daemon, wait_until
from tests.mosquitto import Mosquitto, Subscriber

pytestmark = pytest.mark.anyio

HOST = mqtt.short_hostname()


def mqtt_extra(url: str, **keys: object) -> str:
    text = f'[mqtt]\nurl = "{url}"\n'
    for key, value in keys.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker")
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


async def subscribe(broker: Mosquitto, topic: str = "#") -> Subscriber:
    sub = Subscriber(broker.port, topic)
    await sub.ready()
    return sub


async def send_lines(port: int, lines: list[bytes]) -> None:
    sock = await device(port)
    await asyncio.get_running_loop().sock_sendall(sock, b"".join(line + b"\n" for line in lines))
    sock.close()


async def connected(d: Daemon) -> None:
    await wait_until(lambda: d.runtime.mqtt is not None and d.runtime.mqtt.state == "connected")


# --- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mqtt_table", "expected"),
    [
        ('url = "mqtt://b"\ntopic = "x/{host}"', "unknown placeholder {host}"),
        ('url = "mqtt://b"\nclient_id = "gw-{port}"', "unknown placeholder {port}"),
        ('url = "mqtt://b"\ntopic = "x/{port:>5}"', "{port} takes no format or conversion"),
        ('url = "mqtt://b"\nclient_id = "{hostname!r}"', "{hostname} takes no format"),
        ('url = "mqtt://b"\ntopic = "x/{port.real}"', "unknown placeholder {port.real}"),
        ('url = "mqtt://b"\nqos = 2', "mqtt.qos"),
        ('url = "http://b"', "the scheme is mqtt:// or mqtts://"),
        ('url = "mqtt://b"\ntopic = "x/#"', "no wildcards"),
        ('url = "mqtt://b"\npassword_file = "/p"', "password_file needs username"),
    ],
)
def test_bad_mqtt_config_is_exit_78(
    tmp_path: Path,
    mqtt_table: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f"[mqtt]\n{mqtt_table}\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(cfg)
    assert expected in str(info.value)
    # relayd's main() in this process (its logging set-up left out: it would replace
    # pytest's handlers); the process boundary is checked once, below.
    monkeypatch.setattr(daemon, "configure_logging", lambda level: None)
    assert daemon.main(["--config", str(cfg), "--check-config"]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert expected in err
    assert "Traceback" not in err


def test_bad_mqtt_config_is_exit_78_of_the_process(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text('[mqtt]\nurl = "http://b"\n')
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "--config", str(cfg), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert result.stderr == "relayd: mqtt.url: 'http://b': the scheme is mqtt:// or mqtts://\n"


def test_missing_library_is_exit_78_with_a_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_text('[http]\nhost = "127.0.0.1"\nport = 1\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\n')
    block = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'paho' or name.startswith('paho.'):\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['relayd', *sys.argv[1:]]\n"
        "runpy.run_module('relayd', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", block, "--config", str(cfg), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78, result.stderr
    assert "install python3-paho-mqtt (or pip install 'relayd[mqtt]')" in result.stderr
    check = subprocess.run(
        [sys.executable, "-c", block, "--config", str(cfg), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 78, check.stdout
    assert "install python3-paho-mqtt" in check.stderr
    assert "Traceback" not in result.stderr


def test_topics_render_placeholders() -> None:
    topics = mqtt.Topics("gw/{hostname}/{port}/{name}", "edge1")
    assert topics.render(8100, "scale/1+#") == "gw/edge1/8100/scale_1__"
    assert topics.render(8101, None) == "gw/edge1/8101/8101"


# --- publishing ---------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
async def test_raw_messages_are_published_in_order(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto, qos: int
) -> None:
    sub = await subscribe(broker)
    extra = mqtt_extra(broker.url, qos=qos, topic="t/{hostname}/{port}/{name}")
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await connected(d)
            port = d.ports[0]
            lines = [f"m{i}".encode() for i in range(500)]
            await send_lines(port, lines)
            got = await sub.wait_for(500)
            assert [p for _, p, _ in got] == lines
            assert {t for t, _, _ in got} == {f"t/{HOST}/{port}/dev-{port}"}
            assert not any(r for _, _, r in got)
            await wait_until(lambda: d.runtime.mqtt.spooled == 0)
            assert d.runtime.mqtt.published == 500
    finally:
        sub.close()


async def test_messages_of_every_length_field_size_arrive_whole_in_order(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    sub = await subscribe(broker)
    sizes = [1, 120, 121, 200, 16_370, 16_371, 20_000, 60_000]  # 1- to 3-byte lengths
    lines = [bytes([97 + i]) * size for i, size in enumerate(sizes)]
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=mqtt_extra(broker.url)) as d:
            await connected(d)
            await send_lines(d.ports[0], lines)
            got = await sub.wait_for(len(lines))
            assert [p for _, p, _ in got] == lines
            await wait_until(lambda: d.runtime.mqtt.published == len(lines))
    finally:
        sub.close()


async def test_json_payload_is_the_envelope_and_retain(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    extra = mqtt_extra(broker.url, payload="json", retain=True, qos=1)
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        await connected(d)
        port = d.ports[0]
        await send_lines(port, [b"hello", b"world"])
        await wait_until(lambda: d.runtime.mqtt.published == 2)
        # A subscriber that comes later gets the retained last message.
        sub = await subscribe(broker)
        try:
            topic, payload, retained = (await sub.wait_for(1))[0]
        finally:
            sub.close()
    assert topic == f"relayd/{HOST}/{port}"
    assert retained
    envelope = json.loads(payload)
    assert envelope["data"] == "world"
    assert envelope["port"] == port and envelope["seq"] == 2
    assert envelope["epoch"] == d.runtime.epoch


async def test_broker_down_at_start_ready_anyway_then_published_in_order(
    tmp_path: Path, notify: NotifySocket
) -> None:
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker")
    extra = mqtt_extra(b.url, qos=1)
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        assert d.runtime.mqtt.state == "connecting"
        lines = [f"early{i}".encode() for i in range(200)]
        await send_lines(d.ports[0], lines)
        await wait_until(lambda: d.runtime.mqtt.spooled == 200)
        async with d.admin() as admin:
            status = (await admin.get("/v1/status")).json()
        assert status["mqtt"] == {"state": "connecting", "spooled": 200}
        await b.start()
        sub = await subscribe(b)
        try:
            # The subscriber came first: everything spooled is published after it.
            got = await sub.wait_for(200, timeout=40_000 * MS)
            assert [p for _, p, _ in got] == lines
        finally:
            sub.close()
            await b.stop()


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    extra = mqtt_extra(broker.url, qos=1)
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        await connected(d)
        port = d.ports[0]
        await send_lines(port, [f"a{i}".encode() for i in range(100)])
        await wait_until(lambda: d.runtime.mqtt.published == 100)
        await broker.stop()
        await wait_until(lambda: d.runtime.mqtt.state == "connecting")
        await send_lines(port, [f"b{i}".encode() for i in range(100)])
        await wait_until(lambda: d.runtime.mqtt.spooled == 100)
        await broker.start()
        sub = await subscribe(broker)
        try:
            got = await sub.wait_for(100, timeout=40_000 * MS)
        finally:
            sub.close()
        assert [p for _, p, _ in got] == [f"b{i}".encode() for i in range(100)]


async def test_a_cut_mid_stream_publishes_again_what_was_in_flight(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    from tests.e2e.test_fleet import CuttableProxy

    proxy = CuttableProxy(broker.port)
    await proxy.allow()
    sub = await subscribe(broker)
    n = 10_000  # the cut comes at > 1,000 published (polled every 10 ms)
    lines = [b"c%05d" % i for i in range(n)]
    extra = mqtt_extra(f"mqtt://127.0.0.1:{proxy.port}", qos=1)
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await connected(d)
            await send_lines(d.ports[0], lines)
            uplink = d.runtime.mqtt
            await wait_until(lambda: uplink.published > 1000 and uplink.in_flight > 0)
            await proxy.cut()  # with messages in flight: sent, not acknowledged
            await wait_until(lambda: uplink.state == "connecting")
            assert uplink.published < n
            await proxy.allow()
            await wait_until(lambda: uplink.published >= n and uplink.spooled == 0, 30_000 * MS)

            def first_seen() -> list[bytes]:
                return list(dict.fromkeys(p for _, p, _ in list(sub.messages)))

            await wait_until(lambda: len(first_seen()) >= n, 30_000 * MS)
        assert first_seen() == lines  # in order, duplicates allowed
    finally:
        sub.close()
        await proxy.close()


async def test_spooled_messages_survive_a_restart_of_relayd(
    tmp_path: Path, notify: NotifySocket
) -> None:
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker")
    extra = mqtt_extra(b.url, qos=1)
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        await send_lines(d.ports[0], [f"kept{i}".encode() for i in range(50)])
        await wait_until(lambda: d.runtime.mqtt.spooled == 50)
    assert await d.stop() == 0
    await b.start()
    sub = await subscribe(b)
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d2:
            assert d2.runtime.mqtt.spooled == 50
            got = await sub.wait_for(50, timeout=40_000 * MS)
            assert [p for _, p, _ in got] == [f"kept{i}".encode() for i in range(50)]
    finally:
        sub.close()
        await b.stop()


async def test_stop_with_the_broker_up_waits_for_acks(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    sub = await subscribe(broker)
    extra = mqtt_extra(broker.url, qos=1)
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await connected(d)
            await send_lines(d.ports[0], [f"s{i}".encode() for i in range(2000)])
            await wait_until(lambda: d.runtime.registry.get(d.ports[0]).messages_received == 2000)
            assert await d.stop() == 0
            assert d.runtime.mqtt.spooled == 0
            assert d.runtime.mqtt.published == 2000
        await sub.wait_for(2000)
    finally:
        sub.close()


# --- bad brokers --------------------------------------------------------------------


async def test_bad_credentials_one_log_line_and_backoff(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker", users={"gw": "right"})
    await b.start()
    (tmp_path / "pw").write_text("wrong\n")
    extra = mqtt_extra(b.url, username="gw", password_file=str(tmp_path / "pw"))
    caplog.set_level(logging.INFO, "relayd")
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await wait_until(lambda: d.runtime.mqtt.last_error is not None)
            assert "refused" in d.runtime.mqtt.last_error
            await send_lines(d.ports[0], [b"x"])
            await wait_until(lambda: d.runtime.mqtt.spooled == 1)
            assert d.runtime.mqtt.state == "connecting"
    finally:
        await b.stop()
    refused = [r for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(refused) == 1
    assert "wrong" not in caplog.text


async def test_a_broker_that_never_answers_connect_times_out(
    tmp_path: Path,
    notify: NotifySocket,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # reads CONNECT and says nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(mqtt, "CONNECT_TIMEOUT", 300 * MS)
    caplog.set_level(logging.INFO, "relayd")
    async with server:
        async with run_daemon(
            tmp_path, notify, nports=1, extra=mqtt_extra(f"mqtt://127.0.0.1:{port}")
        ) as d:
            async with asyncio.timeout(5_000 * MS):
                await accepted.wait()
            await wait_until(lambda: d.runtime.mqtt.last_error is not None)
            assert "connect timeout" in d.runtime.mqtt.last_error
            assert d.runtime.mqtt.state == "connecting"


# --- status, STATUS=, metrics -------------------------------------------------------


async def test_status_status_line_and_metrics_follow_the_broker(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    extra = mqtt_extra(broker.url, qos=1)
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        await connected(d)
        await send_lines(d.ports[0], [b"one", b"two"])
        await wait_until(lambda: d.runtime.mqtt.published == 2)
        async with d.admin() as admin:
            assert (await admin.get("/v1/status")).json()["mqtt"] == {
                "state": "connected",
                "spooled": 0,
            }
            metrics = (await admin.get("/metrics")).text
        assert "relayd_mqtt_connected 1.0" in metrics
        assert "relayd_mqtt_published_total 2.0" in metrics
        assert "relayd_mqtt_spooled_messages 0.0" in metrics
        assert "relayd_mqtt_dropped_total 0.0" in metrics
        assert "relayd_mqtt_spool_bytes" in metrics
        await broker.stop()
        message = await notify.wait_for("STATUS=relaying 1 ports, 0 clients, MQTT broker not")
        assert "MQTT broker not connected" in message
        await send_lines(d.ports[0], [b"three"])
        await wait_until(lambda: d.runtime.mqtt.spooled == 1)
        async with d.admin() as admin:
            metrics = (await admin.get("/metrics")).text
        assert "relayd_mqtt_connected 0.0" in metrics
        assert "relayd_mqtt_spooled_messages 1.0" in metrics
        await broker.start()
        async with asyncio.timeout(40_000 * MS):  # connected again: no mention any more
            while "MQTT" in await notify.wait_for("STATUS="):
                pass


# --- downlink_topic -----------------------------------------------------------------


async def test_downlink_topic_writes_to_the_port_devices_audited(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    extra = mqtt_extra(broker.url, downlink_topic="cmd/{hostname}/{port}")
    caplog.set_level(logging.INFO, "relayd.audit")
    async with run_daemon(
        tmp_path, notify, nports=2, extra=extra, port_extra="downlink = true"
    ) as d:
        await connected(d)
        port = d.ports[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: len(d.runtime.registry.get(port).connections) == 1)
        await wait_until(lambda: len(d.runtime.mqtt._subscribed) == 2)
        sub = await subscribe(broker, "nothing")
        try:
            sub.publish(f"cmd/{HOST}/{port}", b"TARE")
            async with asyncio.timeout(10_000 * MS):
                assert await reader.readline() == b"TARE\n"
        finally:
            sub.close()
            writer.close()
    assert f"downlink: mqtt wrote 5 byte(s) to 1 device(s) on port {port}" in caplog.text


# --- reload -------------------------------------------------------------------------


async def test_reload_with_a_changed_mqtt_gets_a_new_client_and_keeps_the_spool(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    (tmp_path / "other").mkdir()
    other = Mosquitto(tmp_path / "other")
    extra = mqtt_extra(other.url, qos=1)  # down
    async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
        await send_lines(d.ports[0], [b"r1", b"r2"])
        await wait_until(lambda: d.runtime.mqtt.spooled == 2)
        sub = await subscribe(broker)
        try:
            d.config.write_text(d.config.read_text().replace(other.url, broker.url))
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code == 200
            got = await sub.wait_for(2)
            assert [p for _, p, _ in got] == [b"r1", b"r2"]
            # a bad [mqtt] is refused and leaves the running uplink alone
            d.config.write_text(d.config.read_text().replace(broker.url, "http://x"))
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code != 200
            await send_lines(d.ports[0], [b"r3"])
            got = await sub.wait_for(3)
            assert got[2][1] == b"r3"
        finally:
            sub.close()


async def test_reload_turns_the_uplink_on_and_off(
    tmp_path: Path, notify: NotifySocket, broker: Mosquitto
) -> None:
    async with run_daemon(tmp_path, notify, nports=1) as d:
        assert d.runtime.mqtt is None and d.runtime.hub.tap is None
        sub = await subscribe(broker)
        try:
            with d.config.open("a") as f:
                f.write(mqtt_extra(broker.url, qos=1))
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code == 200
            await connected(d)
            await send_lines(d.ports[0], [b"on"])
            got = await sub.wait_for(1)
            assert got[0][1] == b"on"
            d.config.write_text(d.config.read_text().split("[mqtt]")[0])
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code == 200
            assert d.runtime.mqtt is None and d.runtime.hub.tap is None
        finally:
            sub.close()


async def test_reload_reads_the_password_file_again(tmp_path: Path, notify: NotifySocket) -> None:
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker", users={"gw": "right"})
    await b.start()
    (tmp_path / "pw").write_text("wrong\n")
    extra = mqtt_extra(b.url, username="gw", password_file=str(tmp_path / "pw"))
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await wait_until(lambda: d.runtime.mqtt.last_error is not None)
            assert d.runtime.mqtt.state == "connecting"
            (tmp_path / "pw").write_text("right\n")  # the config itself is unchanged
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code == 200
            await wait_until(lambda: d.runtime.mqtt.state == "connected")
    finally:
        await b.stop()


# --- TLS ----------------------------------------------------------------------------


async def test_mqtts_with_ca_file_and_a_wrong_ca_is_a_clear_tls_error(
    tmp_path: Path, notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.certs import Authority

    ca = Authority(tmp_path / "ca", "ca")
    wrong = Authority(tmp_path / "wrong", "wrong")
    server = ca.issue("localhost", server=True)
    (tmp_path / "broker").mkdir()
    b = Mosquitto(tmp_path / "broker", tls=(str(server.cert), str(server.key)))
    await b.start()
    caplog.set_level(logging.INFO, "relayd")
    try:
        extra = mqtt_extra(b.url, ca_file=str(ca.cert))
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await connected(d)
            # Many, some large: TLS records and PUBACKs spread over many reads.
            lines = [b"secure"] + [b"%d " % i + b"s" * (i * 97 % 30_000) for i in range(600)]
            await send_lines(d.ports[0], lines)
            await wait_until(lambda: d.runtime.mqtt.published == 601, timeout=20_000 * MS)
            assert d.runtime.mqtt.spooled == 0
        extra = mqtt_extra(b.url, ca_file=str(wrong.cert))
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await wait_until(lambda: d.runtime.mqtt.last_error is not None)
            assert "TLS" in d.runtime.mqtt.last_error
            assert "certificate" in d.runtime.mqtt.last_error
    finally:
        await b.stop()
    assert "TLS: certificate verify failed" in caplog.text


async def test_client_certificate_and_tls_files_read_again_at_reload(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """cert_file/key_file are shown to a broker that requires them; a CA file whose
    content an operator fixed is read again at a reload with the config unchanged."""
    from tests.certs import Authority

    ca = Authority(tmp_path / "ca", "ca")
    wrong = Authority(tmp_path / "wrong", "wrong")
    server = ca.issue("localhost", server=True)
    client = ca.issue("gw")
    (tmp_path / "broker").mkdir()
    b = Mosquitto(
        tmp_path / "broker", tls=(str(server.cert), str(server.key)), client_ca=str(ca.cert)
    )
    await b.start()
    trust = tmp_path / "trust.pem"
    trust.write_bytes(wrong.cert.read_bytes())
    extra = mqtt_extra(
        b.url, ca_file=str(trust), cert_file=str(client.cert), key_file=str(client.key)
    )
    try:
        async with run_daemon(tmp_path, notify, nports=1, extra=extra) as d:
            await wait_until(lambda: d.runtime.mqtt.last_error is not None)
            assert "certificate verify failed" in d.runtime.mqtt.last_error
            async with d.admin() as admin:  # nothing changed: the same client goes on
                assert (await admin.post("/v1/reload")).status_code == 200
            first = d.runtime.mqtt
            trust.write_bytes(ca.cert.read_bytes())
            async with d.admin() as admin:
                assert (await admin.post("/v1/reload")).status_code == 200
            assert d.runtime.mqtt is not first
            await connected(d)
            await send_lines(d.ports[0], [b"mutual"])
            await wait_until(lambda: d.runtime.mqtt.published == 1)
    finally:
        await b.stop()


def test_check_config_checks_the_mqtt_files(tmp_path: Path) -> None:
    """--check-config finds what a start would refuse with 78: an unreadable
    password file, a CA file that is not a certificate."""
    cfg = tmp_path / "relayd.toml"
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    cfg.write_text(f'[mqtt]\nurl = "mqtts://127.0.0.1:1"\nca_file = "{tmp_path / "ca.pem"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "--config", str(cfg), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith("relayd: [mqtt] TLS files: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
