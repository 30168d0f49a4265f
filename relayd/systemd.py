"""sd_notify(3) messages to the service manager, and the watchdog task.

Every method is a no-op without ``$NOTIFY_SOCKET`` and never raises: the
daemon must run the same with or without systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import sdnotify

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        # sdnotify resolves and connects $NOTIFY_SOCKET (abstract names too); its own
        # notify() would block the event loop on a full queue, so relayd sends
        # through the socket itself, without blocking: a service manager that does
        # not read costs notifications, never the relay.
        self._sd = sdnotify.SystemdNotifier() if self._enabled else None
        self._sock: socket.socket | None = getattr(self._sd, "socket", None)
        if self._sock is not None:
            self._sock.setblocking(False)
        self._status = ""
        self.dropped = 0

    def _send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            # STATUS= text comes from relayd and the config: keep it ASCII.
            self._sock.send(message.encode("ascii", "replace"))
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "the service manager is not reading notifications: dropped %s",
                    message.split("\n", 1)[0],
                )
        except OSError as exc:
            logger.debug("sd_notify failed: %s", exc)

    def ready(self) -> None:
        self._send("READY=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        """Close the notification socket (sdnotify never does)."""
        if self._sock is not None:
            self._sock.close()
        self._sock = self._sd = None

    def watchdog_interval(self) -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not self._enabled or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid != str(os.getpid()):
            return None
        return int(usec) / 2_000_000

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` from the event loop until cancelled."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        logger.info("watchdog every %.3f s", interval)
        while True:
            self.watchdog()
            await asyncio.sleep(interval)
