"""``WS /ws``: subscribe a WebSocket client to the hub."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, WebSocket

from relayd.hub import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    HubClosed,
    HubFull,
)
from relayd.runtime import Runtime

logger = logging.getLogger(__name__)

router = APIRouter()


def _parse_query(websocket: WebSocket, runtime: Runtime) -> tuple[list[int] | None, bool]:
    """Requested ports (None: all) and format; ValueError with a reason for the client."""
    params = websocket.query_params
    fmt = params.get("format", "bare")
    if fmt not in ("bare", "json"):
        raise ValueError(f"unknown format {fmt!r} (bare or json)")
    raw_ports = params.getlist("port")
    if not raw_ports:
        return None, fmt == "json"
    ports = []
    for raw in raw_ports:
        if not raw.isdigit() or int(raw) not in runtime.registry:
            raise ValueError(f"unknown port {raw}")
        ports.append(int(raw))
    return ports, fmt == "json"


@router.websocket("/ws")
async def subscribe(websocket: WebSocket) -> None:
    runtime: Runtime = websocket.app.state.runtime
    sink: Any = websocket.scope.get("extensions", {}).get("relayd.sink")
    if sink is None:  # served by a WebSocket implementation other than relayd.wsconn
        await websocket.close(1011, "relayd needs its own WebSocket protocol")
        return
    client = websocket.client
    peer = f"{client.host}:{client.port}" if client else "admin socket"
    try:
        ports, envelope = _parse_query(websocket, runtime)
    except ValueError as exc:
        await websocket.accept()
        await websocket.close(CLOSE_POLICY_VIOLATION, str(exc)[:120])
        return
    try:
        # Subscribe before the handshake completes: nothing published after the
        # client sees the connection open can be missed.
        subscription = runtime.hub.subscribe(sink, ports, envelope)
    except HubFull:
        await websocket.accept()
        await websocket.close(CLOSE_TRY_AGAIN_LATER, "too many clients")
        runtime.ws_rejected += 1
        return
    except HubClosed:
        await websocket.accept()
        await websocket.close(CLOSE_GOING_AWAY, "relayd is stopping")
        return
    sink.attach(subscription)
    runtime.status_changed()
    where = "all ports" if ports is None else "ports " + ",".join(map(str, ports))
    detached = False
    try:
        await websocket.accept()
        logger.info(
            "websocket client %s subscribed to %s%s", peer, where, " (json)" if envelope else ""
        )

        def closed(code: int) -> None:
            runtime.hub.unsubscribe(subscription)
            runtime.status_changed()
            extra = f", {subscription.dropped} message(s) dropped" if subscription.dropped else ""
            logger.info("websocket client %s closed (code %s)%s", peer, code, extra)

        # From here the connection needs no task: the hub writes to it directly, and
        # messages from clients are ignored in v1. closed() runs when it ends.
        sink.detach(closed)
        detached = True
    finally:
        if not detached:
            runtime.hub.unsubscribe(subscription)
            runtime.status_changed()
