"""``GET /metrics``: Prometheus text read from the live objects at scrape time.

The counters live where they are counted (listeners, hub); nothing on the
per-message path touches a metrics library. prometheus_client is imported on
the first scrape, not at start: a gateway nobody scrapes does not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from relayd.runtime import Runtime


class RelayCollector:
    """A prometheus_client collector (it only needs ``collect``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runtime = self.runtime
        listeners = runtime.registry.listeners()
        hub = runtime.hub
        yield GaugeMetricFamily(
            "relayd_ports", "Ports open: listeners and other sources", value=len(listeners)
        )
        yield GaugeMetricFamily("relayd_ws_clients", "WebSocket clients", value=hub.clients)
        connections = GaugeMetricFamily(
            "relayd_tcp_connections", "Device connections per port", labels=["port"]
        )
        received = CounterMetricFamily(
            "relayd_messages_received", "Messages read from devices", labels=["port"]
        )
        received_bytes = CounterMetricFamily(
            "relayd_bytes_received", "Bytes read from devices", labels=["port"]
        )
        rejected = CounterMetricFamily(
            "relayd_tcp_connections_rejected",
            "Device connections refused, by reason (max_connections, not_allowed, tls, draining)",
            labels=["port", "reason"],
        )
        framing = CounterMetricFamily(
            "relayd_framing_errors",
            "Device streams that broke their framing, by reason (too_long, partial)",
            labels=["port", "reason"],
        )
        connected = GaugeMetricFamily(
            "relayd_source_connected",
            "Whether a connect or serial source has its device (1) or is trying (0)",
            labels=["port"],
        )
        reconnects = CounterMetricFamily(
            "relayd_source_reconnects",
            "Dials or opens of a connect or serial source after its first",
            labels=["port"],
        )
        for listener in listeners:
            port = [str(listener.port)]
            if listener.kind != "listen":
                connected.add_metric(port, 1 if listener.connections else 0)
                reconnects.add_metric(port, listener.reconnects)
            for why, count in listener.framing_errors.items():
                framing.add_metric([*port, why], count)
            connections.add_metric(port, len(listener.connections))
            received.add_metric(port, listener.messages_received)
            received_bytes.add_metric(port, listener.bytes_received)
            for why, count in listener.rejected.items():
                rejected.add_metric([*port, why], count)
        yield from (connections, received, received_bytes, rejected, framing)
        yield from (connected, reconnects)
        history = GaugeMetricFamily(
            "relayd_history_bytes",
            "Bytes of messages kept for ?last and ?since, per port (relay.history_max_bytes)",
            labels=["port"],
        )
        for number, nbytes in hub.history.nbytes.items():
            history.add_metric([str(number)], nbytes)
        yield history
        yield CounterMetricFamily(
            "relayd_messages_sent", "Messages written to WebSocket clients", value=hub.messages_sent
        )
        dropped = CounterMetricFamily(
            "relayd_messages_dropped", "Messages dropped for slow clients", labels=["reason"]
        )
        for reason, count in hub.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        http_rejected = CounterMetricFamily(
            "relayd_http_connections_closed",
            "[http] connections closed before their request: failed TLS handshake or timeout",
            labels=["reason"],
        )
        for reason, count in runtime.http_rejected.items():
            http_rejected.add_metric([reason], count)
        yield http_rejected
        stats = runtime.downlink.stats
        down_messages = CounterMetricFamily(
            "relayd_downlink_messages", "Downlink writes accepted, per port", labels=["port"]
        )
        down_bytes = CounterMetricFamily(
            "relayd_downlink_bytes", "Bytes written to devices by downlink", labels=["port"]
        )
        for number, count in stats.messages.items():
            down_messages.add_metric([str(number)], count)
            down_bytes.add_metric([str(number)], stats.bytes.get(number, 0))
        down_rejected = CounterMetricFamily(
            "relayd_downlink_rejected", "Downlink messages refused, by reason", labels=["reason"]
        )
        for refused, count in stats.rejected.items():
            down_rejected.add_metric([refused], count)
        yield from (down_messages, down_bytes, down_rejected)
        auth = CounterMetricFamily(
            "relayd_auth_failures",
            "Requests refused by access control, by reason",
            labels=["reason"],
        )
        for failure, count in runtime.access.failures.counts.items():
            auth.add_metric([failure], count)
        yield auth
        yield CounterMetricFamily(
            "relayd_ws_clients_rejected",
            "WebSocket handshakes refused over relay.max_clients",
            value=hub.rejected,
        )
        yield from _mqtt(runtime)


def _mqtt(runtime: Runtime) -> Iterator[Metric]:
    """The MQTT uplink (relayd(8), MQTT); zeros when [mqtt] is off."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    mqtt = runtime.mqtt
    spool = mqtt.spool if mqtt is not None else None
    yield GaugeMetricFamily(
        "relayd_mqtt_connected",
        "Whether the MQTT broker connection is up (1) or not (0)",
        value=1 if mqtt is not None and mqtt.state == "connected" else 0,
    )
    yield CounterMetricFamily(
        "relayd_mqtt_published",
        "Messages the MQTT broker acknowledged (QoS 1) or was handed (QoS 0)",
        value=mqtt.published if mqtt is not None else 0,
    )
    yield GaugeMetricFamily(
        "relayd_mqtt_spooled_messages",
        "Messages in the spool not yet acknowledged by or handed to the broker",
        value=mqtt.spooled if mqtt is not None else 0,
    )
    yield GaugeMetricFamily(
        "relayd_mqtt_spool_bytes",
        "Bytes of the spool on disk (mqtt.spool_max_bytes)",
        value=spool.bytes if spool is not None else 0,
    )
    yield CounterMetricFamily(
        "relayd_mqtt_dropped",
        "Messages dropped from the spool, oldest first, over mqtt.spool_max_bytes",
        value=spool.dropped if spool is not None else 0,
    )


class Metrics:
    """The registry of one runtime, made on the first scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._registry: CollectorRegistry | None = None

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        if self._registry is None:
            self._registry = make_registry(self.runtime)
        return generate_latest(self._registry)


def make_registry(runtime: Runtime) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(runtime))
    return registry
