"""What ``relayctl status``, ``ports list`` and ``ports show`` print (relayctl(1)).

The typer commands of ``relayd.cli`` and the quick path of ``relayd.ctl`` both
run these, so their output, errors and exit codes are the same code. Nothing
here imports typer.
"""

from __future__ import annotations

from relayd.cli_output import (
    count,
    echo,
    human_bytes,
    human_duration,
    key_values,
    mqtt_line,
    ports_table,
    print_json,
    seconds,
    text,
)
from relayd.cli_transport import Target, answer_object, answer_ports, call

SOURCE_KEYS = ("connect", "serial")
FRAMING_KEYS = ("delimiter", "length_prefix", "size")


def status(target: Target, *, as_json: bool) -> None:
    """relayd's state, version and counts, and its listener ports."""
    response = call(target, "GET", "/v1/status")
    if as_json:
        print_json(response.text)
        return
    info = answer_object(target, response)
    port_list = answer_ports(target, call(target, "GET", "/v1/ports"))
    echo(
        key_values(
            [
                ("state", text(info.get("state"))),
                ("version", text(info.get("version"))),
                ("pid", text(info.get("pid"))),
                ("uptime", human_duration(seconds(info.get("uptime_s")))),
                ("http", text(info.get("http"))),
                ("ports", str(count(info.get("ports")))),
                ("tcp connections", str(count(info.get("tcp_connections")))),
                ("ws clients", str(count(info.get("ws_clients")))),
                *mqtt_line(info.get("mqtt")),
            ]
        )
    )
    if port_list:
        echo("")
        echo(ports_table(port_list))


def ports_list(target: Target, *, as_json: bool) -> None:
    """The listener ports with their counters."""
    response = call(target, "GET", "/v1/ports")
    if as_json:
        print_json(response.text)
        return
    port_list = answer_ports(target, response)
    echo(ports_table(port_list) if port_list else "no listener ports")


def ports_show(target: Target, port: int, *, as_json: bool) -> None:
    """Listener ``port`` in detail."""
    response = call(target, "GET", f"/v1/ports/{port}")
    if as_json:
        print_json(response.text)
        return
    p = answer_object(target, response)
    received = count(p.get("bytes_received"))
    echo(
        key_values(
            [
                ("port", text(p.get("port"))),
                ("name", text(p.get("name"))),
                ("kind", text(p.get("kind", "listen"))),
                ("host", text(p.get("host"))),
                *[(key, text(p[key])) for key in SOURCE_KEYS if p.get(key) is not None],
                ("framing", text(p.get("framing"))),
                *[(key, text(p[key])) for key in FRAMING_KEYS if p.get(key) is not None],
                ("max connections", text(p.get("max_connections"))),
                ("state", text(p.get("state"))),
                *([("last error", text(p["last_error"]))] if p.get("last_error") else []),
                ("source", text(p.get("source"))),
                ("connections", str(count(p.get("connections")))),
                ("messages", str(count(p.get("messages_received")))),
                ("bytes", f"{human_bytes(received)} ({received})"),
            ]
        )
    )
