"""The MQTT uplink's setup: its library, spool, password, TLS context and topics (relayd(8), MQTT).

And what a failed connection attempt leaves behind: its sockets, the reason to log.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Protocol

from relayd.config import MqttSettings
from relayd.errors import ConfigError
from relayd.spool import Spool as DiskSpool
from relayd.spool import SpoolError, SpoolRecord

INSTALL_HINT = "install python3-paho-mqtt (or pip install 'relayd[mqtt]')"
MAX_FILE_BYTES = 1 << 20  # read of a password or TLS file to see whether it changed


class Spool(Protocol):
    """What the uplink needs of the spool (relayd.spool)."""

    @property
    def messages(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    def append(self, topic: str, payload: builtins.bytes) -> None: ...
    def flush(self) -> None: ...
    def read(self, max_records: int) -> list[SpoolRecord]: ...
    def rewind(self) -> None: ...
    def ack(self, record_id: int) -> None: ...
    async def sync(self) -> None: ...
    def close(self) -> None: ...


def open_spool(directory: Path, max_bytes: int) -> Spool:
    """The disk spool; ConfigError (exit 78) when its directory is unusable."""
    try:
        return DiskSpool.open(directory, max_bytes=max_bytes)
    except SpoolError as exc:
        raise ConfigError([f"[mqtt] spool: {exc}"]) from None


def import_paho() -> Any:
    """paho's client module; ConfigError with the install hint when it is missing."""
    try:
        import paho.mqtt.client as client
    except ImportError:
        raise ConfigError(
            [f"[mqtt] is configured but paho-mqtt is missing: {INSTALL_HINT}"]
        ) from None
    return client


def short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def read_password(settings: MqttSettings) -> str | None:
    if settings.password_file is None:
        return None
    try:
        text = Path(settings.password_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise ConfigError(
            [f"mqtt.password_file: cannot read {settings.password_file}: {reason}"]
        ) from None
    return text


def files_digest(settings: MqttSettings) -> bytes:
    """What ``password_file``, ``ca_file``, ``cert_file`` and ``key_file`` hold now.

    A reload compares it with what the running client was made from (relayd.toml(5):
    the files are read at each reload). An unreadable file counts as changed; making
    the client then gives the error.
    """
    digest = hashlib.sha256()
    for path in (settings.password_file, settings.ca_file, settings.cert_file, settings.key_file):
        digest.update(b"\0")
        if path is not None:
            try:
                with open(path, "rb") as f:
                    digest.update(f.read(MAX_FILE_BYTES))
            except OSError:
                digest.update(os.urandom(16))
    return digest.digest()


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file is not None:
            context.load_cert_chain(settings.cert_file, settings.key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([f"[mqtt] TLS files: {reason}"]) from None
    return context


def _topic_part(value: str) -> str:
    """A port name inside a topic: no level separator, no wildcard."""
    return value.replace("/", "_").replace("+", "_").replace("#", "_")


class Topics:
    """The rendered topics of each port (``{hostname}``, ``{port}``, ``{name}``)."""

    def __init__(self, template: str, hostname: str) -> None:
        self.template = template
        self.hostname = hostname
        self._cache: dict[tuple[int, str | None], str] = {}

    def render(self, port: int, name: str | None) -> str:
        key = (port, name)
        topic = self._cache.get(key)
        if topic is None:
            topic = self.template.format(
                hostname=self.hostname, port=port, name=_topic_part(name or str(port))
            )
            self._cache[key] = topic
        return topic


def close_sockets(exc: BaseException) -> None:
    """Close the sockets a failed ``connect()`` left open.

    paho (2.1, 2.2) does not close its TLS socket when the handshake fails; it
    is still referenced by the traceback's frames, so close it there rather
    than leave it to the garbage collector (a descriptor held per attempt).
    """
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "no answer to CONNECT in time (connect timeout)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
